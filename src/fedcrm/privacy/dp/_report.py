"""The privacy report a branch sends after every train message, admitted or refused.

Sent in the reply's ``privacy`` ConfigRecord; the coordinator checks it and writes it to the
privacy ledger. See docs/privacy-analysis.md#the-ledger.
"""

import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Literal, cast, get_args

from fedcrm.exceptions import ConfigError
from fedcrm.privacy.dp._config import ACCOUNTANTS, AccountantName

PrivacyUnitName = Literal["record", "customer"]
"""What one DP-SGD row is on a branch, so what its ε protects."""
DecisionName = Literal["admitted", "refused"]


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyReport:
    """A branch's privacy account of one train message, admitted or refused.

    Sent in the reply's ``privacy`` ConfigRecord; the coordinator records it in the ledger.

    Attributes:
        decision: ``"admitted"`` (trained) or ``"refused"`` (nothing trained, nothing sent).
        reason: Why, with the figures (from :class:`fedcrm.privacy.dp.BudgetDecision`).
        branch: The branch's name in the ledger.
        model: Model the budget is kept for.
        purpose: Purpose the budget is kept for.
        privacy_unit: ``"customer"`` when every training row is a distinct customer, else
            ``"record"``.
        epsilon_round: ε this round added (a refusal: what it would have added).
        epsilon_before: Cumulative ε before the round.
        epsilon: Cumulative ε after the round (a refusal: unchanged).
        budget: The branch's ε budget for (model, purpose).
        delta: δ of every ε figure.
        noise_multiplier: σ planned for the federation.
        sample_rate: Poisson sampling rate q.
        steps: Noisy steps taken this round (0 when refused).
        planned_steps: Steps the round was admitted for (the budget check's figure).
        max_grad_norm: Clipping norm C.
        accountant: ``"rdp"`` or ``"prv"``.
        library_version: Accounting library, e.g. ``opacus 1.6.0``.
        spend_id: Id of the spend in the branch accountant (reserved before training); empty
            for a refusal. The ledger stores it, so one spend is never recorded twice.
    """

    decision: DecisionName
    reason: str
    branch: str
    model: str
    purpose: str
    privacy_unit: PrivacyUnitName
    epsilon_round: float
    epsilon_before: float
    epsilon: float
    budget: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    planned_steps: int
    max_grad_norm: float
    accountant: AccountantName
    library_version: str
    spend_id: str = ""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.decision not in get_args(DecisionName):
            problems.append(f"decision must be admitted or refused, got {self.decision!r}")
        if self.privacy_unit not in get_args(PrivacyUnitName):
            problems.append(f"privacy_unit must be record or customer, got {self.privacy_unit!r}")
        if self.accountant not in ACCOUNTANTS:
            problems.append(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        for name in ("reason", "branch", "model", "purpose", "library_version"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                problems.append(f"{name} must be a non-empty string")
        for name in ("epsilon_round", "epsilon_before", "epsilon", "budget", "max_grad_norm"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value < 0:
                problems.append(f"{name} must be a finite number >= 0, got {value!r}")
        if not _is_real(self.delta) or not 0 < self.delta < 1:
            problems.append(f"delta must satisfy 0 < delta < 1, got {self.delta!r}")
        if not _is_real(self.sample_rate) or not 0 < self.sample_rate <= 1:
            problems.append(f"sample_rate must satisfy 0 < q <= 1, got {self.sample_rate!r}")
        if not _is_real(self.noise_multiplier) or not self.noise_multiplier > 0:
            problems.append(f"noise_multiplier must be > 0, got {self.noise_multiplier!r}")
        for name in ("steps", "planned_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.spend_id, str) or len(self.spend_id) > 64:
            problems.append("spend_id must be a string of at most 64 characters")
        if not problems and self.epsilon < self.epsilon_before:
            problems.append("cumulative epsilon decreased during the round")
        if (
            not problems
            and self.decision == "refused"
            and (self.steps != 0 or self.epsilon != self.epsilon_before)
        ):
            problems.append("a refused round takes no step and spends no epsilon")
        if problems:
            raise ConfigError("invalid privacy report: " + "; ".join(problems))

    @property
    def admitted(self) -> bool:
        """Whether the branch trained this round."""
        return self.decision == "admitted"

    def to_record(self) -> dict[str, str | float | int]:
        """Plain values for a Flower ``ConfigRecord`` (kebab-case keys)."""
        return {name.replace("_", "-"): value for name, value in asdict(self).items()}

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> "PrivacyReport":
        """Parse and validate what :meth:`to_record` produced (a branch's reply).

        Raises:
            ConfigError: A key is missing or a value is invalid.
        """
        values: dict[str, object] = {}
        for item in fields(cls):
            key = item.name.replace("_", "-")
            if key not in record:
                if item.default is not MISSING:
                    continue
                raise ConfigError(f"privacy report lacks {key!r}")
            value = record[key]
            if item.name in ("steps", "planned_steps") and _is_real(value):
                value = int(cast(float, value)) if float(cast(float, value)).is_integer() else value
            values[item.name] = value
        return cls(**values)  # type: ignore[arg-type]
