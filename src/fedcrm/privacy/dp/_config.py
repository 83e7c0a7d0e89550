"""The DP-SGD settings of a federated run, chosen by the coordinator and sent to every branch.

Built once at the edge (:meth:`DPSGDConfig.from_run_config`) and passed down; each branch plans
its own noise from it (:func:`fedcrm.privacy.dp.plan_for_config`), because its sampling rate and
default δ depend on its row count. See docs/privacy-analysis.md#dp-sgd-on-a-branch.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, get_args

from fedcrm import wire as k
from fedcrm.exceptions import ConfigError
from fedcrm.privacy.dp._errors import InvalidDPConfig

AccountantName = Literal["rdp", "prv"]
"""Privacy accountants: RDP (Mironov 2017, the default) or PRV (Gopi et al. 2021)."""

GradSampleMode = Literal["hooks", "ew", "functorch", "ghost", "fast-linear"]
"""How per-sample gradients are computed.

``hooks``, ``ew``, ``functorch`` and ``ghost`` are Opacus's modes; ``fast-linear`` is fedcrm's
hand-written path for models whose parameters all sit in ``nn.Linear`` layers (the churn MLP).
"""

ACCOUNTANTS: Final[tuple[str, ...]] = get_args(AccountantName)
GRAD_SAMPLE_MODES: Final[tuple[str, ...]] = get_args(GradSampleMode)
DEFAULT_MODEL: Final = "churn"
DEFAULT_PURPOSE: Final = "churn-model-training"
DEFAULT_DELTA_FACTOR: Final = 10
"""Unset δ is 1/(10·n) on a branch of n DP-SGD rows (δ ≪ 1/n; see :meth:`DPSGDConfig.delta_for`)."""

DPSGD_RUN_CONFIG_KEYS: Final[dict[str, str]] = {
    k.KEY_DP_TARGET_EPSILON: "target_epsilon",
    k.KEY_DP_DELTA: "delta",
    k.KEY_DP_MAX_GRAD_NORM: "max_grad_norm",
    k.KEY_DP_ACCOUNTANT: "accountant",
    k.KEY_DP_GRAD_SAMPLE_MODE: "grad_sample_mode",
    k.KEY_DP_NOISE_MULTIPLIER: "noise_multiplier",
    k.KEY_DP_MAX_EPSILON: "max_epsilon",
    k.KEY_DP_CUSTOMER_BUDGET: "customer_budget",
    k.KEY_PRIVACY_MODEL: "model",
    k.KEY_PRIVACY_PURPOSE: "purpose",
    k.KEY_LEDGER_URL: "ledger_url",
}
"""Run-config key -> :class:`DPSGDConfig` field (the ``[dp]`` TOML keys are these without
``dp-``)."""
_OPTIONAL_ZERO_IS_UNSET: Final = frozenset(
    {"delta", "noise_multiplier", "max_epsilon", "customer_budget"}
)
_MAX_NAME: Final = 64


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True, kw_only=True)
class DPSGDConfig:
    """Record- or customer-level DP-SGD settings of a federated run, chosen by the coordinator.

    DP-SGD follows Abadi et al. 2016 (arXiv:1607.00133): Poisson-sample each batch, clip each
    example's gradient to ``max_grad_norm`` and add Gaussian noise of standard deviation
    ``noise_multiplier * max_grad_norm`` to the sum. What one DP-SGD row is (a record, or a
    customer with all their rows) is the task's choice.

    Attributes:
        target_epsilon: ε each branch may reach after all planned rounds; its noise multiplier
            is planned once, for the whole federation, from this target.
        delta: δ of every branch's guarantee; ``None`` means 1/(10·n) per branch (n = its
            DP-SGD rows); a δ not below a branch's 1/n is refused there.
        max_grad_norm: Per-example clipping norm C.
        accountant: ``"rdp"`` (default) or ``"prv"``.
        grad_sample_mode: Per-sample gradient implementation, see :data:`GradSampleMode`. The
            default, ``fast-linear``, is the only one within 1.5x of non-private training for the
            churn MLP (``bench/dp_cost.py``); models with other layers need ``hooks``.
        noise_multiplier: A fixed σ instead of planning one (``None``: plan from the target).
        max_epsilon: The budget of (model, purpose) on each branch, enforced before every round
            and across runs; ``None`` makes the target the budget.
        customer_budget: The privacy filter: before each round a branch leaves out the
            customers whose own ε (individual accounting) would pass this, instead of refusing
            the round; ``None``: no filter. At most the budget; needs one DP-SGD row per
            customer.
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
    customer_budget: float | None = None
    model: str = DEFAULT_MODEL
    purpose: str = DEFAULT_PURPOSE
    ledger_url: str | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []

        def positive_real(name: str, value: object) -> None:
            if not (isinstance(value, int | float) and not isinstance(value, bool)) or not (
                math.isfinite(value) and value > 0
            ):
                problems.append(f"{name} must be a finite number > 0, got {value!r}")

        positive_real("target_epsilon", self.target_epsilon)
        delta: object = self.delta
        if delta is not None and (
            not (isinstance(delta, int | float) and not isinstance(delta, bool))
            or not 0.0 < delta < 1.0
        ):
            problems.append(f"delta must satisfy 0 < delta < 1, got {delta!r}")
        positive_real("max_grad_norm", self.max_grad_norm)
        if self.accountant not in ACCOUNTANTS:
            problems.append(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            problems.append(
                f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, "
                f"got {self.grad_sample_mode!r}"
            )
        if self.noise_multiplier is not None:
            positive_real("noise_multiplier", self.noise_multiplier)
        if self.max_epsilon is not None:
            positive_real("max_epsilon", self.max_epsilon)
            if (
                _is_real(self.max_epsilon)
                and _is_real(self.target_epsilon)
                and self.max_epsilon < self.target_epsilon
            ):
                problems.append(
                    f"max_epsilon ({self.max_epsilon}) must be >= target_epsilon "
                    f"({self.target_epsilon}): the planned rounds would be refused"
                )
        if self.customer_budget is not None:
            positive_real("customer_budget", self.customer_budget)
            budget = self.target_epsilon if self.max_epsilon is None else self.max_epsilon
            if (
                _is_real(self.customer_budget)
                and _is_real(budget)
                and self.customer_budget > budget
            ):
                problems.append(
                    f"customer_budget ({self.customer_budget}) must be <= the branch budget "
                    f"({budget}): the branch's own budget would refuse the round first"
                )
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

    @property
    def budget(self) -> float:
        """The ε budget of (model, purpose) on every branch (``max_epsilon`` or the target)."""
        return self.target_epsilon if self.max_epsilon is None else self.max_epsilon

    def delta_for(self, num_rows: int) -> float:
        """δ on a branch with ``num_rows`` DP-SGD rows: 1/(10·n) unless configured.

        δ is the chance that the guarantee fails outright; δ ≥ 1/n admits a mechanism that
        publishes one of n rows in the clear, so a configured δ must stay below 1/n
        (docs/privacy-analysis.md#choosing-delta).

        Raises:
            ConfigError: ``num_rows`` < 1, or the configured δ is not below 1/n.
        """
        if num_rows < 1:
            raise ConfigError(f"DP-SGD needs at least 1 training row, got {num_rows}")
        if self.delta is None:
            return 1.0 / (DEFAULT_DELTA_FACTOR * num_rows)
        if self.delta >= 1.0 / num_rows:
            raise ConfigError(
                f"delta {self.delta:g} is not below 1/n = {1.0 / num_rows:g} for this branch's "
                f"{num_rows} DP-SGD rows: a guarantee that may fail with probability 1/n "
                "protects no one; set [dp] delta below 1/n (e.g. "
                f"{1.0 / (DEFAULT_DELTA_FACTOR * num_rows):.2g}) or leave it unset for 1/(10n)"
            )
        return self.delta

    @classmethod
    def from_run_config(
        cls,
        run_config: Mapping[str, object],
        *,
        model: str = DEFAULT_MODEL,
        purpose: str = DEFAULT_PURPOSE,
    ) -> "DPSGDConfig | None":
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
            key for key in run_config if key.startswith("dp-") and key not in DPSGD_RUN_CONFIG_KEYS
        )
        if unknown:
            raise InvalidDPConfig(
                [
                    f"unknown key {key!r}; known keys: {sorted(DPSGD_RUN_CONFIG_KEYS)}"
                    for key in unknown
                ]
            )
        target = run_config.get(k.KEY_DP_TARGET_EPSILON)
        if target is None or (_is_real(target) and target == 0):
            return None
        values: dict[str, object] = {"model": model, "purpose": purpose}
        for key, name in DPSGD_RUN_CONFIG_KEYS.items():
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
        for key, name in DPSGD_RUN_CONFIG_KEYS.items():
            value = getattr(self, name)
            if value is None or (name == "ledger_url" and not include_ledger):
                continue
            out[key] = value
        return out

    def describe(self) -> str:
        """One line for logs and reports (ε with its unit, δ rule, accountant, mechanism)."""
        delta = "1/(10n) per branch" if self.delta is None else f"{self.delta:g}"
        return (
            f"record-level DP-SGD (one row per customer: customer-level), target epsilon "
            f"{self.target_epsilon:g} per branch, budget {self.budget:g} for "
            f"({self.model}, {self.purpose}), delta {delta}, clipping norm "
            f"{self.max_grad_norm:g}, {self.accountant.upper()} accountant, Poisson-subsampled "
            "Gaussian mechanism"
            + (
                ""
                if self.customer_budget is None
                else f"; privacy filter: customers above epsilon {self.customer_budget:g} of "
                "their own are left out of a round"
            )
        )
