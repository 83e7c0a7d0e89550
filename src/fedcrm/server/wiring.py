"""The strategy wrappers of a run, built once for the simulation and the deployed ServerApp alike.

What wraps the task's optimisation strategy (inside the reply validation), from typed settings:

* ``[aggregation] mode = "he"``: `HEAggregation` (the server loads only the public context and
  keeps ciphertext checkpoints), and with ``[central-dp] mode = "distributed"`` the
  `DistributedDPStrategy` around it;
* ``mode = "secagg"``: `SecAggPlusAggregation` (Flower's SecAgg+ workflow);
* ``robust``: a Byzantine-robust aggregator in place of FedAvg (plaintext mode);
* ``[central-dp]`` (the other modes): `CentralDPStrategy` around Flower's DP wrappers.

`check_plan` applies the guardrails (`fedcrm.strategies.guardrails`) to the whole combination,
before any round: an experiment file is checked before Ray starts, a deployed run before the
first message. Run-config keys of a deployment: ``aggregation-mode``, ``he-public-context``,
``he-checkpoint-dir``, ``secagg-*``, ``central-dp-*`` (all declared in ``pyproject.toml``).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from flwr.app import MetricRecord
from flwr.serverapp.strategy import FedAvg, Strategy

from fedcrm import wire as k
from fedcrm.compliance import PrivacyLedger, open_store
from fedcrm.exceptions import ConfigError
from fedcrm.privacy import CentralDPConfig, CentralDPMode
from fedcrm.privacy.he import HEContext
from fedcrm.strategies.central_dp import CentralDPStrategy
from fedcrm.strategies.distributed_dp import DistributedDPStrategy
from fedcrm.strategies.guardrails import (
    AggregationMode,
    RobustAggregator,
    ServerClipping,
    check_combination,
)
from fedcrm.strategies.he import HEAggregation
from fedcrm.strategies.robust import RobustConfig, robust_strategy
from fedcrm.strategies.secagg import RUN_CONFIG_KEYS as SECAGG_KEYS
from fedcrm.strategies.secagg import SecAggConfig, SecAggPlusAggregation

KEY_HE_PUBLIC_CONTEXT: Final = "he-public-context"
KEY_HE_CHECKPOINT_DIR: Final = "he-checkpoint-dir"
DEFAULT_CHECKPOINT_DIR: Final = "he-checkpoints"
_ROBUST_KEYS: Final = ("robust", "krum-malicious", "multi-krum-select", "trim-beta")


@dataclass(frozen=True)
class AggregationConfig:
    """How the server aggregates (the ``[aggregation]`` table; ``aggregation-mode`` keys).

    ``mode = "he"`` sums CKKS ciphertexts; ``mode = "secagg"`` runs Flower's SecAgg+
    (``secagg-*`` keys: `SecAggConfig`); ``robust`` picks a Byzantine-robust aggregator for
    plaintext mode. Refused combinations are explained by `check_plan`.
    """

    mode: AggregationMode = AggregationMode.PLAIN
    robust: RobustConfig = field(default_factory=RobustConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)

    @classmethod
    def from_table(cls, section: Mapping[str, Any]) -> "AggregationConfig":
        """Build the ``[aggregation]`` table of an experiment.

        Raises:
            ConfigError: A key is unknown or a value invalid.
        """
        allowed = {"mode", *_ROBUST_KEYS, *SECAGG_KEYS}
        unknown = sorted(set(section) - allowed)
        if unknown:
            raise ConfigError(
                f"[aggregation] has unknown key(s) {unknown}; allowed: {sorted(allowed)}"
            )
        raw = section.get("mode", "plain")
        modes = [m.value for m in AggregationMode]
        if raw not in modes:
            raise ConfigError(f"[aggregation] mode must be one of {modes}, got {raw!r}")
        try:
            mode = AggregationMode(raw)
            if mode is not AggregationMode.SECAGG and any(key in section for key in SECAGG_KEYS):
                raise ConfigError("secagg-* keys need mode = 'secagg'")
            robust = RobustConfig(
                aggregator=RobustAggregator(section.get("robust", "none")),
                num_malicious=int(section.get("krum-malicious", 1)),
                num_selected=int(section.get("multi-krum-select", 2)),
                trim_beta=float(section.get("trim-beta", 0.1)),
            )
            return cls(mode=mode, robust=robust, secagg=SecAggConfig.from_run_config(section))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"[aggregation]: {exc}") from exc

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "AggregationConfig":
        """The deployed run's ``aggregation-mode`` and ``secagg-*`` keys.

        Raises:
            ConfigError: Unknown mode or invalid SecAgg+ settings.
        """
        raw = str(run_config.get(k.KEY_AGGREGATION_MODE) or AggregationMode.PLAIN)
        try:
            mode = AggregationMode(raw)
        except ValueError as exc:
            allowed = [str(m) for m in AggregationMode]
            raise ConfigError(
                f"{k.KEY_AGGREGATION_MODE} must be one of {allowed}, got {raw!r}"
            ) from exc
        return cls(mode=mode, secagg=SecAggConfig.from_run_config(run_config))

    def to_table(self) -> dict[str, Any]:
        """The resolved ``[aggregation]`` table."""
        return {
            "mode": str(self.mode),
            "robust": str(self.robust.aggregator),
            "krum-malicious": self.robust.num_malicious,
            "multi-krum-select": self.robust.num_selected,
            "trim-beta": self.robust.trim_beta,
            **(self.secagg.to_run_config() if self.mode is AggregationMode.SECAGG else {}),
        }


def check_plan(
    aggregation: AggregationConfig,
    central_dp: CentralDPConfig | None,
    *,
    strategy: str,
    dp: bool,
    consent: bool,
) -> None:
    """Refuse a combination of aggregation, DP and consent settings that cannot work.

    Raises:
        fedcrm.strategies.guardrails.CombinationRefused: Listing every refused pair.
        ConfigError: SecAgg+ with DP-SGD or a consent gate (its replies carry no privacy report
            or round manifest for the ledger and the audit log).
    """
    distributed = central_dp is not None and central_dp.mode is CentralDPMode.DISTRIBUTED
    clipping = ServerClipping.NONE
    if central_dp is not None and not (central_dp.mode.client_side or distributed):
        clipping = ServerClipping.ADAPTIVE if central_dp.mode.adaptive else ServerClipping.FIXED
    check_combination(
        mode=aggregation.mode,
        robust=aggregation.robust.aggregator,
        strategy=strategy,
        server_clipping=clipping,
        central_dp=central_dp is not None,
        distributed_dp=distributed,
    )
    if aggregation.mode is AggregationMode.SECAGG and (dp or consent):
        raise ConfigError(
            "[dp] and [compliance] with mode 'secagg' are not supported yet: SecAgg+ replies "
            "carry no privacy report or round manifest for the ledger and the audit log; use "
            "mode 'plain' or 'he' with them"
        )


class Wiring:
    """The wrappers of one run; after the run, the built ones hold their summaries.

    Args:
        aggregation: The aggregation settings.
        central_dp: Branch-level DP (``None``: none).
        rounds: The run's rounds (central DP plans its noise for them).
        run_id: The run's id in the ledger.
        ledger_url: The privacy ledger of branch-level DP rounds.
        round_timeout: Seconds each SecAgg+ stage waits for replies.
        public_context: HE runs: the key authority's public context (a secret one is refused).
        checkpoint_dir: HE runs: where the server keeps the ciphertext checkpoints.
        min_honest: Distributed DP's ``K_min``.
    """

    def __init__(
        self,
        aggregation: AggregationConfig,
        central_dp: CentralDPConfig | None,
        *,
        rounds: int,
        run_id: str,
        ledger_url: str,
        round_timeout: float,
        public_context: HEContext | None = None,
        checkpoint_dir: Path | None = None,
        min_honest: int = 2,
    ) -> None:
        if aggregation.mode is AggregationMode.HE and public_context is None:
            raise ConfigError(
                f"{k.KEY_AGGREGATION_MODE} = 'he' needs {KEY_HE_PUBLIC_CONTEXT}: the path of the "
                "key authority's public.tenseal (fedcrm keys init)"
            )
        self.aggregation = aggregation
        self.central_dp = central_dp
        self.rounds = rounds
        self.run_id = run_id
        self.ledger_url = ledger_url
        self.round_timeout = round_timeout
        self.public_context = public_context
        self.checkpoint_dir = checkpoint_dir
        self.min_honest = min_honest
        self.he: HEAggregation | None = None
        self.central: CentralDPStrategy | None = None
        self.distributed: DistributedDPStrategy | None = None

    @property
    def wraps(self) -> bool:
        """Whether any wrapper applies (else the inner strategy runs as it is)."""
        robust = self.aggregation.robust.aggregator is not RobustAggregator.NONE
        plain = self.aggregation.mode is AggregationMode.PLAIN
        return not plain or robust or self.central_dp is not None

    def _ledger(self) -> PrivacyLedger:
        return PrivacyLedger(open_store(self.ledger_url))

    def wrap(self, inner: Strategy) -> Strategy:
        """Wrap the task's inner strategy (the core puts the reply validation around it).

        Raises:
            ConfigError: A robust aggregator around something other than FedAvg.
        """
        mode, central = self.aggregation.mode, self.central_dp
        if mode is AggregationMode.HE:
            if self.public_context is None:  # pragma: no cover - refused in __init__
                raise ConfigError("HE aggregation without a public context")
            self.he = HEAggregation(
                inner, public_context=self.public_context, checkpoint_dir=self.checkpoint_dir
            )
            if central is None:
                return self.he
            self.distributed = DistributedDPStrategy(
                self.he,
                central,
                rounds=self.rounds,
                min_honest=self.min_honest,
                ledger=self._ledger(),
                run_id=self.run_id,
            )
            return self.distributed
        if mode is AggregationMode.SECAGG:
            return SecAggPlusAggregation(inner, self.aggregation.secagg, timeout=self.round_timeout)
        if self.aggregation.robust.aggregator is not RobustAggregator.NONE:
            if not isinstance(inner, FedAvg):  # robust_strategy refuses FedAvg's subclasses
                raise ConfigError(f"{self.aggregation.robust.aggregator} replaces FedAvg only")
            inner = robust_strategy(inner, self.aggregation.robust)
        if central is not None:
            self.central = CentralDPStrategy(
                inner, central, rounds=self.rounds, ledger=self._ledger(), run_id=self.run_id
            )
            return self.central
        return inner

    def check_statistics(self, records: Sequence[MetricRecord]) -> None:
        """Refuse before round 1 a branch whose example count SecAgg+ cannot weigh.

        Raises:
            ConfigError: A branch announced more examples than ``secagg-max-weight``.
        """
        if self.aggregation.mode is AggregationMode.SECAGG and records:
            counts = [float(r[k.KEY_NUM_EXAMPLES]) for r in records]  # type: ignore[arg-type]
            self.aggregation.secagg.check_weight(int(max(counts)))

    def central_summary(self) -> dict[str, object] | None:
        """What each round of branch-level DP spent (``None``: no branch-level DP)."""
        built = self.central or self.distributed
        return None if built is None else built.summary_data.as_dict()
