"""Branch-level (central) DP settings of a run: the ``[central-dp]`` table, parsed and planned.

:class:`CentralDPConfig` says which Flower wrapper clips (or, under HE, that the branches clip
and noise), the target ε or a fixed multiplier, δ and the budget; :meth:`CentralDPConfig.plan`
fixes every round's noise before the first. See docs/privacy-analysis.md#branch-level-central-dp.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from fedcrm import wire as k
from fedcrm.exceptions import ConfigError
from fedcrm.privacy.dp._analysis import AccountingEvent, compute_epsilon, plan_noise_multiplier
from fedcrm.privacy.dp._central import (
    CENTRAL_SAMPLE_RATE,
    DEFAULT_COUNT_STDDEV_FACTOR,
    CentralNoisePlan,
    update_noise_for,
)
from fedcrm.privacy.dp._config import ACCOUNTANTS, AccountantName

DEFAULT_DELTA: Final = 1e-5
RUN_CONFIG_PREFIX: Final = "central-dp-"
"""Run-config keys (``flwr run --run-config``) are the ``[central-dp]`` keys with this prefix."""


class CentralDPMode(StrEnum):
    """Which Flower wrapper clips and where."""

    SERVER_FIXED = "server-fixed"
    """``DifferentialPrivacyServerSideFixedClipping``: the server clips every update to ``C``."""
    SERVER_ADAPTIVE = "server-adaptive"
    """``DifferentialPrivacyServerSideAdaptiveClipping``: the server clips, ``C`` follows a
    quantile of the update norms."""
    CLIENT_FIXED = "client-fixed"
    """``DifferentialPrivacyClientSideFixedClipping`` + ``fixedclipping_mod`` on the branch."""
    CLIENT_ADAPTIVE = "client-adaptive"
    """``DifferentialPrivacyClientSideAdaptiveClipping`` + ``adaptiveclipping_mod``."""
    DISTRIBUTED = "distributed"
    """Under HE only: each branch clips to ``C`` and adds its share of the noise before
    encrypting (:class:`fedcrm.privacy.dp.DistributedNoise`); the server only sums ciphertexts."""

    @property
    def adaptive(self) -> bool:
        """Whether the clipping norm adapts (and a noisy clipped count is released)."""
        return self in (CentralDPMode.SERVER_ADAPTIVE, CentralDPMode.CLIENT_ADAPTIVE)

    @property
    def client_side(self) -> bool:
        """Whether branches clip their own update (a client mod)."""
        return self in (CentralDPMode.CLIENT_FIXED, CentralDPMode.CLIENT_ADAPTIVE)


def _real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class CentralDPConfig:
    """Branch-level DP settings of a run (the ``[central-dp]`` table).

    Exactly one of ``target_epsilon`` and ``noise_multiplier`` is set.

    Attributes:
        mode: Which wrapper clips, and whether the clipping norm adapts.
        target_epsilon: ε of the whole run per branch; the noise is planned from it.
        noise_multiplier: A fixed effective multiplier ``z_eff`` per round instead.
        delta: δ of the guarantee (default 1e-5, far below 1 / number of branches).
        clipping_norm: ``C`` for fixed clipping; the initial ``C`` for adaptive clipping.
        target_quantile: Adaptive: the quantile of update norms ``C`` tracks, i.e. the share
            of updates left unclipped (Andrew et al.'s ``gamma``).
        clip_norm_lr: Adaptive: the geometric learning rate of ``C`` (``eta_C``).
        clipped_count_stddev: Adaptive: ``sigma_b``; ``None``: 2 x the effective multiplier.
        accountant: ``"rdp"`` (default) or ``"prv"``.
        max_epsilon: Budget of the federation for (model, purpose), checked before every
            round against the ledger's history; ``None``: the target (no budget when only a
            noise multiplier is given).
        model: The model the budget is kept for.
        purpose: The processing purpose the budget is kept for.
        min_honest_branches: Distributed mode only: ``K_min``, the honest branches each
            branch's noise share is sized for; ``None``: the federation's ``min-train-nodes``.

    Raises:
        ConfigError: Listing every invalid value.
    """

    mode: CentralDPMode = CentralDPMode.SERVER_FIXED
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = DEFAULT_DELTA
    clipping_norm: float = 1.0
    target_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float | None = None
    accountant: AccountantName = "rdp"
    max_epsilon: float | None = None
    model: str = "churn"
    purpose: str = "churn-model-training"
    min_honest_branches: int | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        try:
            object.__setattr__(self, "mode", CentralDPMode(self.mode))
        except ValueError:
            problems.append(
                f"mode must be one of {[m.value for m in CentralDPMode]}, got {self.mode!r}"
            )
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            problems.append("set exactly one of target-epsilon and noise-multiplier")
        positive = {
            "target-epsilon": self.target_epsilon,
            "noise-multiplier": self.noise_multiplier,
            "clipping-norm": self.clipping_norm,
            "clip-norm-lr": self.clip_norm_lr,
            "clipped-count-stddev": self.clipped_count_stddev,
            "max-epsilon": self.max_epsilon,
        }
        for name, value in positive.items():
            if value is not None and not (_real(value) and value > 0):
                problems.append(f"{name} must be a finite number > 0, got {value!r}")
        if not (_real(self.delta) and 0 < self.delta < 1):
            problems.append(f"delta must satisfy 0 < delta < 1, got {self.delta!r}")
        if not (_real(self.target_quantile) and 0 < self.target_quantile < 1):
            problems.append(
                "target-quantile must satisfy 0 < target-quantile < 1, "
                f"got {self.target_quantile!r}"
            )
        if self.accountant not in ACCOUNTANTS:
            problems.append(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        for name in ("model", "purpose"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip() or len(value) > 64:
                problems.append(f"{name} must be a non-empty string of at most 64 characters")
        k_min = self.min_honest_branches
        if k_min is not None:
            if isinstance(k_min, bool) or not isinstance(k_min, int) or k_min < 1:
                problems.append(f"min-honest-branches must be an integer >= 1, got {k_min!r}")
            elif self.mode is not CentralDPMode.DISTRIBUTED:
                problems.append("min-honest-branches applies to mode 'distributed' only")
        if (
            not problems
            and self.noise_multiplier is not None
            and self.clipped_count_stddev is not None
            and isinstance(self.mode, CentralDPMode)
            and self.mode.adaptive
            and self.clipped_count_stddev <= self.noise_multiplier
        ):
            problems.append(
                f"clipped-count-stddev ({self.clipped_count_stddev:g}) must exceed "
                f"noise-multiplier ({self.noise_multiplier:g})"
            )
        if problems:
            raise ConfigError("central DP: " + "; ".join(problems))

    @classmethod
    def from_run_config(
        cls,
        run_config: Mapping[str, object],
        *,
        model: str = "churn",
        purpose: str = "churn-model-training",
    ) -> "CentralDPConfig | None":
        """Build from Flower's run config (the deployed ServerApp, ``flwr run --run-config``).

        The keys are the ``[central-dp]`` keys prefixed with ``central-dp-``
        (``central-dp-mode``, ``central-dp-target-epsilon``, ...). ``pyproject.toml`` declares
        them with values that mean "off": ``central-dp-mode = ""`` (or ``"none"``, or absent)
        is a run without central DP, and a ``central-dp-target-epsilon``,
        ``central-dp-noise-multiplier``, ``central-dp-clipped-count-stddev``,
        ``central-dp-max-epsilon`` or ``central-dp-min-honest-branches`` of 0 means "not set";
        an absent or empty ``central-dp-model`` / ``central-dp-purpose`` takes ``model`` /
        ``purpose`` (the run's task's).
        The combination with the run's aggregation is checked by the wiring
        (`fedcrm.server.wiring.check_plan`).

        Returns:
            The settings, or ``None`` when the mode is off.

        Raises:
            ConfigError: A ``central-dp-*`` key is unknown, a value is invalid, or a target or
                noise multiplier is set without a mode.
        """
        unknown = sorted(
            key for key in run_config if key.startswith(RUN_CONFIG_PREFIX) and key not in RUN_KEYS
        )
        if unknown:
            raise ConfigError(
                f"central DP: unknown run-config key(s) {unknown}; known keys: {sorted(RUN_KEYS)}"
            )
        values: dict[str, object] = {"model": model, "purpose": purpose}
        for key, name in RUN_KEYS.items():
            value = run_config.get(key)
            if value is None or (name in _ZERO_IS_UNSET and _real(value) and value == 0):
                continue
            if name in ("model", "purpose") and value == "":
                continue
            if isinstance(value, int) and not isinstance(value, bool) and name in _FLOATS:
                value = float(value)
            values[name] = value
        mode = values.pop("mode", "")
        if mode in ("", "none"):
            stray = sorted(RUN_CONFIG_PREFIX + n.replace("_", "-") for n in _GOALS & set(values))
            if stray:
                raise ConfigError(
                    f"central DP: {stray} set but {k.KEY_CENTRAL_DP_MODE} is off; set "
                    f"{k.KEY_CENTRAL_DP_MODE} to one of {[m.value for m in CentralDPMode]}"
                )
            return None
        try:
            cfg = cls(mode=mode, **values)  # type: ignore[arg-type]
        except ConfigError as exc:
            raise ConfigError(
                f"{exc} (run-config keys: {RUN_CONFIG_PREFIX}<key>, e.g. {k.KEY_CENTRAL_DP_MODE})"
            ) from exc
        return cfg

    @property
    def budget(self) -> float | None:
        """The ε budget of the federation for (model, purpose), if any."""
        return self.max_epsilon if self.max_epsilon is not None else self.target_epsilon

    def plan(self, rounds: int) -> CentralNoisePlan:
        """Plan the run's noise so that ε after ``rounds`` rounds is <= the target.

        Raises:
            ConfigError: ``rounds`` < 1, or σ_b is too small for the planned multiplier.
            fedcrm.privacy.dp.NoiseCalibrationError: The target cannot be reached.
        """
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ConfigError(f"rounds must be an integer >= 1, got {rounds!r}")
        if self.noise_multiplier is not None:
            effective = float(self.noise_multiplier)
        elif self.target_epsilon is None:  # pragma: no cover - excluded by __post_init__
            raise ConfigError("set exactly one of target-epsilon and noise-multiplier")
        else:
            effective = plan_noise_multiplier(
                target_epsilon=self.target_epsilon,
                delta=self.delta,
                sample_rate=CENTRAL_SAMPLE_RATE,
                steps_per_round=1,
                rounds=rounds,
                accountant=self.accountant,
            )
        count: float | None = None
        update = effective
        if self.mode.adaptive:
            count = self.clipped_count_stddev
            if count is None:
                count = DEFAULT_COUNT_STDDEV_FACTOR * effective
            update = update_noise_for(effective, count)
        planned = compute_epsilon(
            [AccountingEvent(effective, CENTRAL_SAMPLE_RATE, rounds)],
            delta=self.delta,
            accountant=self.accountant,
        )
        return CentralNoisePlan(
            effective_noise_multiplier=effective,
            update_noise_multiplier=update,
            clipped_count_stddev=count,
            rounds=rounds,
            planned_epsilon=planned,
            delta=self.delta,
            accountant=self.accountant,
        )

    def describe(self) -> str:
        """One line for logs and reports (unit, relation, mechanism, δ, accountant)."""
        goal = (
            f"target epsilon {self.target_epsilon:g}"
            if self.target_epsilon is not None
            else f"noise multiplier {self.noise_multiplier:g}"
        )
        clip = "initial clipping norm" if self.mode.adaptive else "clipping norm"
        return (
            f"branch-level central DP ({self.mode}): {goal} per branch, delta {self.delta:g}, "
            f"{clip} {self.clipping_norm:g}, Gaussian mechanism on the sum of clipped branch "
            f"updates, add/remove one branch's data, no sampling amplification (q = 1), "
            f"{self.accountant.upper()} accountant"
        )


TOML_KEYS: Final[dict[str, str]] = {
    "mode": "mode",
    "target-epsilon": "target_epsilon",
    "noise-multiplier": "noise_multiplier",
    "delta": "delta",
    "clipping-norm": "clipping_norm",
    "target-quantile": "target_quantile",
    "clip-norm-lr": "clip_norm_lr",
    "clipped-count-stddev": "clipped_count_stddev",
    "accountant": "accountant",
    "max-epsilon": "max_epsilon",
    "model": "model",
    "purpose": "purpose",
    "min-honest-branches": "min_honest_branches",
}
"""``[central-dp]`` TOML key -> :class:`CentralDPConfig` field."""
RUN_KEYS: Final[dict[str, str]] = {RUN_CONFIG_PREFIX + key: name for key, name in TOML_KEYS.items()}
"""Run-config key -> :class:`CentralDPConfig` field (:meth:`CentralDPConfig.from_run_config`)."""
_ZERO_IS_UNSET: Final = frozenset(
    {
        "target_epsilon",
        "noise_multiplier",
        "clipped_count_stddev",
        "max_epsilon",
        "min_honest_branches",
    }
)
_GOALS: Final = frozenset({"target_epsilon", "noise_multiplier"})
_FLOATS: Final = frozenset(
    {
        "target_epsilon",
        "noise_multiplier",
        "delta",
        "clipping_norm",
        "target_quantile",
        "clip_norm_lr",
        "clipped_count_stddev",
        "max_epsilon",
    }
)


def parse_central_dp(
    section: Mapping[str, Any], *, model: str = "churn", purpose: str = "churn-model-training"
) -> CentralDPConfig:
    """Build the settings from a ``[central-dp]`` table (``model`` / ``purpose``: the task's).

    Raises:
        ConfigError: A key is unknown or a value invalid (every problem listed).
    """
    unknown = sorted(set(section) - set(TOML_KEYS))
    if unknown:
        raise ConfigError(
            f"[central-dp] has unknown key(s) {unknown}; allowed: {sorted(TOML_KEYS)}"
        )
    if "mode" not in section:
        raise ConfigError(f"[central-dp] needs mode, one of {[m.value for m in CentralDPMode]}")
    values: dict[str, Any] = {"model": model, "purpose": purpose}
    values.update({TOML_KEYS[key]: value for key, value in section.items()})
    try:
        return CentralDPConfig(**values)
    except TypeError as exc:  # pragma: no cover - all keys are mapped to fields
        raise ConfigError(f"[central-dp]: {exc}") from exc


def central_dp_toml(cfg: CentralDPConfig) -> dict[str, float | str]:
    """The resolved ``[central-dp]`` table (unset values left out)."""
    out: dict[str, float | str] = {}
    for key, name in TOML_KEYS.items():
        value = getattr(cfg, name)
        if value is not None:
            out[key] = str(value) if isinstance(value, StrEnum) else value
    return out
