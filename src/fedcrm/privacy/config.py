"""Typed, frozen configuration of record-level DP-SGD on a branch.

Built once at the edge of an app (``DPConfig.from_run_config(context.run_config)``) and passed
down; nothing else reads ``run_config`` keys for DP settings.

Notes:
    Privacy unit: one training row. The churn tables hold one row per customer, so record-level
    protection is customer-level protection there. For tables with several rows per customer set
    ``max_rows_per_customer`` and bound contributions with
    :func:`fedcrm.privacy.dp_sgd.cap_rows_per_customer` before DP-SGD (otherwise the guarantee
    covers one row, not one customer).
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, get_args

from fedcrm.exceptions import ConfigError

AccountantName = Literal["rdp", "prv"]
"""Privacy accountants: RDP (Mironov 2017, the default) or PRV (Gopi et al. 2021)."""

GradSampleMode = Literal["hooks", "ew", "functorch", "ghost", "fast-linear"]
"""How per-sample gradients are computed.

``hooks``, ``ew``, ``functorch`` and ``ghost`` are Opacus's modes; ``fast-linear`` is fedcrm's
hand-written path for models whose parameters all sit in ``nn.Linear`` layers (the churn MLP).
"""

ACCOUNTANTS: Final[tuple[str, ...]] = get_args(AccountantName)
GRAD_SAMPLE_MODES: Final[tuple[str, ...]] = get_args(GradSampleMode)

# Run-config keys (kebab-case, as Flower expects) -> DPConfig field names. Keys shared with the
# rest of the app (batch size, epochs, rounds) carry no ``dp-`` prefix.
RUN_CONFIG_KEYS: Final[dict[str, str]] = {
    "dp-target-epsilon": "target_epsilon",
    "dp-delta": "delta",
    "dp-max-grad-norm": "max_grad_norm",
    "dp-accountant": "accountant",
    "dp-grad-sample-mode": "grad_sample_mode",
    "dp-noise-multiplier": "noise_multiplier",
    "dp-max-epsilon": "max_epsilon",
    "dp-max-rows-per-customer": "max_rows_per_customer",
    "dp-poisson-sampling": "poisson_sampling",
    "dp-secure-mode": "secure_mode",
    "batch-size": "batch_size",
    "local-epochs": "local_epochs",
    "num-rounds": "rounds",
}


class InvalidDPConfig(ConfigError):
    """A DP configuration value is out of range or of the wrong type.

    Args:
        problems: Every problem found, each naming the field and the constraint it breaks.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid DP configuration ({len(self.problems)} problem(s)):\n{lines}")


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True, kw_only=True)
class DPConfig:
    """Record-level DP-SGD settings of one branch for a whole federation run.

    DP-SGD follows Abadi et al. 2016 (arXiv:1607.00133): clip each example's gradient to
    ``max_grad_norm`` and add Gaussian noise of standard deviation
    ``noise_multiplier * max_grad_norm`` to the sum, with Poisson sampling of each batch.

    Attributes:
        target_epsilon: ε the branch may reach after all planned rounds (planning target).
        delta: δ of the (ε, δ) guarantee; the usual choice is below 1 / (rows on the branch).
        max_grad_norm: Per-example clipping norm C.
        batch_size: Expected batch size; the Poisson sampling rate is batch size / branch rows.
        local_epochs: Local epochs per federated round.
        rounds: Planned federated rounds (the noise is planned once, for all of them).
        accountant: ``"rdp"`` (default) or ``"prv"``.
        grad_sample_mode: Per-sample gradient implementation, see :data:`GradSampleMode`. The
            default, ``fast-linear``, is the only one within 1.5x of non-private training for the
            churn MLP (``bench/dp_cost.py``); models with other layers need ``hooks``.
        noise_multiplier: Fixed σ; ``None`` (default) plans σ from the target ε.
        max_epsilon: Hard budget enforced before each round; defaults to ``target_epsilon``.
        max_rows_per_customer: Contribution bound for tables with repeated customers; ``None``
            when the table has one row per customer (churn).
        poisson_sampling: Keep ``True``: the accountants assume Poisson sampling. ``False``
            makes the reported ε an approximation.
        secure_mode: Ask for Opacus's cryptographically secure noise; unavailable here
            (torchcsprng does not install), so ``make_private`` refuses it.
    """

    target_epsilon: float
    delta: float
    max_grad_norm: float
    batch_size: int = 64
    local_epochs: int = 1
    rounds: int = 1
    accountant: AccountantName = "rdp"
    grad_sample_mode: GradSampleMode = "fast-linear"
    noise_multiplier: float | None = None
    max_epsilon: float | None = None
    max_rows_per_customer: int | None = None
    poisson_sampling: bool = True
    secure_mode: bool = False

    def __post_init__(self) -> None:
        problems: list[str] = []

        def positive_real(name: str, value: object) -> None:
            if not (isinstance(value, int | float) and not isinstance(value, bool)) or not (
                math.isfinite(value) and value > 0
            ):
                problems.append(f"{name} must be a finite number > 0, got {value!r}")

        def positive_int(name: str, value: object) -> None:
            if not (isinstance(value, int) and not isinstance(value, bool)) or value < 1:
                problems.append(f"{name} must be an integer >= 1, got {value!r}")

        positive_real("target_epsilon", self.target_epsilon)
        delta: object = self.delta
        if not (isinstance(delta, int | float) and not isinstance(delta, bool)) or not (
            0.0 < delta < 1.0
        ):
            problems.append(f"delta must satisfy 0 < delta < 1, got {self.delta!r}")
        positive_real("max_grad_norm", self.max_grad_norm)
        positive_int("batch_size", self.batch_size)
        positive_int("local_epochs", self.local_epochs)
        positive_int("rounds", self.rounds)
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
        if self.max_rows_per_customer is not None:
            positive_int("max_rows_per_customer", self.max_rows_per_customer)
        for name in ("poisson_sampling", "secure_mode"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if problems:
            raise InvalidDPConfig(problems)

    @property
    def budget(self) -> float:
        """The hard ε budget enforced before each round (``max_epsilon`` or the target)."""
        return self.target_epsilon if self.max_epsilon is None else self.max_epsilon

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> "DPConfig":
        """Build the configuration from Flower's flat, kebab-case ``run_config``.

        Keys read are those of :data:`RUN_CONFIG_KEYS`; other keys are ignored, except unknown
        ``dp-*`` keys, which are rejected so that a typo cannot silently drop a privacy setting.
        A ``dp-noise-multiplier``, ``dp-max-epsilon`` or ``dp-max-rows-per-customer`` of ``0``
        means "not set".

        Args:
            run_config: The run configuration (``context.run_config``).

        Returns:
            The validated configuration.

        Raises:
            InvalidDPConfig: A key is unknown, missing or holds an invalid value.
        """
        unknown = sorted(k for k in run_config if k.startswith("dp-") and k not in RUN_CONFIG_KEYS)
        if unknown:
            raise InvalidDPConfig(
                [f"unknown key {k!r}; known dp keys: {sorted(RUN_CONFIG_KEYS)}" for k in unknown]
            )
        missing = [
            key
            for key in ("dp-target-epsilon", "dp-delta", "dp-max-grad-norm")
            if key not in run_config
        ]
        if missing:
            raise InvalidDPConfig([f"missing required key {k!r}" for k in missing])
        kwargs: dict[str, object] = {}
        for key, name in RUN_CONFIG_KEYS.items():
            if key not in run_config:
                continue
            value = run_config[key]
            if (
                name in ("noise_multiplier", "max_epsilon", "max_rows_per_customer")
                and _is_real(value)
                and value == 0
            ):
                value = None
            kwargs[name] = value
        return cls(**kwargs)  # type: ignore[arg-type]
