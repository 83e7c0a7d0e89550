"""Record-level DP for a whole federation: the run's settings and a branch's privacy report.

Pure data (no torch, no Flower): :class:`FederatedDPConfig` is what the coordinator decides for
every branch (target ε, δ rule, clipping norm, accountant, budget per model and purpose); each
branch turns it into its own :class:`fedcrm.privacy.config.DPConfig` with
:meth:`FederatedDPConfig.for_branch`, because the sampling rate and the default δ depend on its
own row count. :class:`PrivacyReport` is what a branch sends back after every train message,
admitted or refused, and what the coordinator writes to the privacy ledger.

Notes:
    Privacy unit: one training row. The churn tables hold one row per customer (the export
    check rejects repeated ids), so record-level DP-SGD is customer-level DP there; a branch
    reports ``privacy_unit = "customer"`` only after checking that its training ids are unique.

    δ: unless set, each branch uses δ = 1/n with n its own training rows (the issue's
    record-level convention). That is the largest δ commonly accepted; set ``delta`` lower for a
    stronger statement.
"""

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Final, Literal, cast, get_args

from fedcrm import wire as k
from fedcrm.exceptions import ConfigError
from fedcrm.privacy.config import (
    ACCOUNTANTS,
    AccountantName,
    DPConfig,
    GradSampleMode,
    InvalidDPConfig,
)

DEFAULT_MODEL: Final = "churn"
DEFAULT_PURPOSE: Final = "churn-model-training"
PrivacyUnitName = Literal["record", "customer"]
DecisionName = Literal["admitted", "refused"]

# Run-config key -> FederatedDPConfig field (the ``[dp]`` TOML keys are these without "dp-").
RUN_CONFIG_KEYS: Final[dict[str, str]] = {
    k.KEY_DP_TARGET_EPSILON: "target_epsilon",
    k.KEY_DP_DELTA: "delta",
    k.KEY_DP_MAX_GRAD_NORM: "max_grad_norm",
    k.KEY_DP_ACCOUNTANT: "accountant",
    k.KEY_DP_GRAD_SAMPLE_MODE: "grad_sample_mode",
    k.KEY_DP_NOISE_MULTIPLIER: "noise_multiplier",
    k.KEY_DP_MAX_EPSILON: "max_epsilon",
    k.KEY_PRIVACY_MODEL: "model",
    k.KEY_PRIVACY_PURPOSE: "purpose",
    k.KEY_LEDGER_URL: "ledger_url",
}
_OPTIONAL_ZERO_IS_UNSET: Final = frozenset({"delta", "noise_multiplier", "max_epsilon"})
_MAX_NAME: Final = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class FederatedDPConfig:
    """Record-level DP-SGD settings of a federated run, chosen by the coordinator.

    Attributes:
        target_epsilon: ε each branch may reach after all planned rounds; its noise multiplier
            is planned once, for the whole federation, from this target.
        delta: δ of every branch's guarantee; ``None`` means 1/n per branch (n = its training
            rows).
        max_grad_norm: Per-example clipping norm C.
        accountant: ``"rdp"`` (default) or ``"prv"``.
        grad_sample_mode: Per-sample gradient implementation (``fast-linear`` for the churn MLP).
        noise_multiplier: A fixed σ instead of planning one (``None``: plan from the target).
        max_epsilon: The budget of (model, purpose) on each branch, enforced before every round
            and across runs; ``None`` makes the target the budget.
        model: The model the budget is kept for.
        purpose: The processing purpose the budget is kept for.
        ledger_url: Where the coordinator's privacy ledger lives (SQLAlchemy URL); ``None``:
            the run's default (``ledger.db`` in a simulation's run directory).

    Raises:
        InvalidDPConfig: Listing every invalid value.
    """

    target_epsilon: float
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: AccountantName = "rdp"
    grad_sample_mode: GradSampleMode = "fast-linear"
    noise_multiplier: float | None = None
    max_epsilon: float | None = None
    model: str = DEFAULT_MODEL
    purpose: str = DEFAULT_PURPOSE
    ledger_url: str | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        try:  # reuse DPConfig's range checks; the per-branch values below are placeholders
            self._probe(delta=0.5 if self.delta is None else self.delta)
        except InvalidDPConfig as exc:
            problems.extend(exc.problems)
        for name in ("model", "purpose"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip() or len(value) > _MAX_NAME:
                problems.append(f"{name} must be a non-empty string of at most {_MAX_NAME} chars")
        if self.ledger_url is not None and (
            not isinstance(self.ledger_url, str) or not self.ledger_url.strip()
        ):
            problems.append("ledger_url must be a non-empty SQLAlchemy URL or unset")
        if problems:
            raise InvalidDPConfig(problems)

    def _probe(self, *, delta: float) -> DPConfig:
        return DPConfig(
            target_epsilon=self.target_epsilon,
            delta=delta,
            max_grad_norm=self.max_grad_norm,
            accountant=self.accountant,
            grad_sample_mode=self.grad_sample_mode,
            noise_multiplier=self.noise_multiplier,
            max_epsilon=self.max_epsilon,
        )

    @property
    def budget(self) -> float:
        """The ε budget of (model, purpose) on every branch."""
        return self.target_epsilon if self.max_epsilon is None else self.max_epsilon

    def delta_for(self, num_rows: int) -> float:
        """δ on a branch with ``num_rows`` training rows (1/n unless configured).

        Raises:
            ConfigError: ``num_rows`` < 2 (δ = 1/n must be below 1).
        """
        if self.delta is not None:
            return self.delta
        if num_rows < 2:
            raise ConfigError(f"delta = 1/n needs at least 2 training rows, got {num_rows}")
        return 1.0 / num_rows

    def for_branch(
        self, *, num_rows: int, batch_size: int, local_epochs: int, rounds: int
    ) -> DPConfig:
        """The branch's own :class:`DPConfig` (its δ and, through the batch size, its q).

        Raises:
            InvalidDPConfig: A value is out of range.
            ConfigError: The branch has fewer than 2 training rows.
        """
        return DPConfig(
            target_epsilon=self.target_epsilon,
            delta=self.delta_for(num_rows),
            max_grad_norm=self.max_grad_norm,
            batch_size=batch_size,
            local_epochs=local_epochs,
            rounds=rounds,
            accountant=self.accountant,
            grad_sample_mode=self.grad_sample_mode,
            noise_multiplier=self.noise_multiplier,
            max_epsilon=self.max_epsilon,
        )

    @classmethod
    def from_run_config(
        cls,
        run_config: Mapping[str, object],
        *,
        model: str = DEFAULT_MODEL,
        purpose: str = DEFAULT_PURPOSE,
    ) -> "FederatedDPConfig | None":
        """Build from flat kebab-case keys (run config or a train message's config).

        ``None`` when ``dp-target-epsilon`` is absent or 0 (a run without DP; Flower's
        ``[tool.flwr.app.config]`` can declare it as 0 so that ``--run-config`` may set it). A
        ``dp-delta``, ``dp-noise-multiplier`` or ``dp-max-epsilon`` of 0 means "not set"; an
        absent or empty ``privacy-model`` / ``privacy-purpose`` takes ``model`` / ``purpose``
        (the run's task's).

        Raises:
            InvalidDPConfig: A ``dp-*`` key is unknown, or a value is invalid.
        """
        unknown = sorted(
            key for key in run_config if key.startswith("dp-") and key not in RUN_CONFIG_KEYS
        )
        if unknown:
            raise InvalidDPConfig(
                [f"unknown key {key!r}; known keys: {sorted(RUN_CONFIG_KEYS)}" for key in unknown]
            )
        target = run_config.get(k.KEY_DP_TARGET_EPSILON)
        if target is None or (_is_real(target) and target == 0):
            return None
        values: dict[str, object] = {"model": model, "purpose": purpose}
        for key, name in RUN_CONFIG_KEYS.items():
            if key not in run_config:
                continue
            value = run_config[key]
            if name in _OPTIONAL_ZERO_IS_UNSET and _is_real(value) and value == 0:
                continue
            if name in ("ledger_url", "model", "purpose") and value == "":
                continue
            values[name] = value
        return cls(**values)  # type: ignore[arg-type]

    def to_run_config(self, *, include_ledger: bool = True) -> dict[str, float | str]:
        """Flat kebab-case keys accepted by :meth:`from_run_config` (unset values left out).

        Args:
            include_ledger: Include ``ledger-url`` (leave it out of messages to branches).
        """
        out: dict[str, float | str] = {}
        for key, name in RUN_CONFIG_KEYS.items():
            value = getattr(self, name)
            if value is None or (name == "ledger_url" and not include_ledger):
                continue
            out[key] = value
        return out

    def describe(self) -> str:
        """One line for logs and reports (ε with its unit, δ rule, accountant, mechanism)."""
        delta = "1/n per branch" if self.delta is None else f"{self.delta:g}"
        return (
            f"record-level DP-SGD (one row per customer: customer-level), target epsilon "
            f"{self.target_epsilon:g} per branch, budget {self.budget:g} for "
            f"({self.model}, {self.purpose}), delta {delta}, clipping norm "
            f"{self.max_grad_norm:g}, {self.accountant.upper()} accountant, Poisson-subsampled "
            "Gaussian mechanism"
        )


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyReport:
    """A branch's privacy account of one train message, admitted or refused.

    Sent in the reply's ``privacy`` ConfigRecord; the coordinator records it in the ledger.

    Attributes:
        decision: ``"admitted"`` (trained) or ``"refused"`` (nothing trained, nothing sent).
        reason: Why, with the figures (from :class:`fedcrm.privacy.budget.BudgetDecision`).
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
                raise ConfigError(f"privacy report lacks {key!r}")
            value = record[key]
            if item.name in ("steps", "planned_steps") and _is_real(value):
                value = int(cast(float, value)) if float(cast(float, value)).is_integer() else value
            values[item.name] = value
        return cls(**values)  # type: ignore[arg-type]
