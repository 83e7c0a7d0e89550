"""Experiment configuration: a TOML file naming the data, the branches and the federation.

Example (``examples/mlc_by_state.toml``)::

    name = "mlc-by-state"
    dataset = "mlc"

    [partition]
    kind = "natural"
    column = "state"

    [federation]
    num-rounds = 30
    strategy = "fedavg"

    [dp]                      # optional: record-level DP-SGD on every branch
    target-epsilon = 3.0      # per branch, after all planned rounds
    max-grad-norm = 1.0       # delta defaults to 1/n per branch (n = its training rows)
"""

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcrm.data.partition import PartitionKind
from fedcrm.data.schema import SCHEMAS
from fedcrm.exceptions import ConfigError
from fedcrm.privacy.branch_accounting import (
    CentralDPConfig,
    CentralDPMode,
    central_dp_toml,
    parse_central_dp,
)
from fedcrm.privacy.federated import RUN_CONFIG_KEYS as DP_RUN_CONFIG_KEYS
from fedcrm.privacy.federated import FederatedDPConfig
from fedcrm.server.config import FederationConfig
from fedcrm.simulation.consent_setup import ConsentSetup, compliance_toml, parse_compliance
from fedcrm.strategies.factory import StrategyName
from fedcrm.strategies.guardrails import (
    AggregationMode,
    RobustAggregator,
    ServerClipping,
    check_combination,
)
from fedcrm.strategies.robust import RobustConfig
from fedcrm.strategies.secagg import RUN_CONFIG_KEYS as SECAGG_KEYS
from fedcrm.strategies.secagg import SecAggConfig

SYNTHETIC_PREFIX = "synthetic:"


@dataclass(frozen=True)
class PartitionConfig:
    """How the pooled data is split into virtual branches."""

    kind: PartitionKind = PartitionKind.IID
    num_branches: int = 10
    column: str = "state"
    alpha: float = 0.5
    min_branch_size: int = 30


@dataclass(frozen=True)
class BaselineConfig:
    """Centralised baselines trained on the pooled training rows of the same split."""

    enabled: bool = True
    torch_epochs: int = 30


@dataclass(frozen=True)
class AggregationConfig:
    """How the server aggregates (the ``[aggregation]`` table).

    ``mode = "he"`` sums CKKS ciphertexts (keys created in the run directory);
    ``mode = "secagg"`` runs Flower's SecAgg+ (``secagg-*`` keys: `SecAggConfig`);
    ``robust`` picks a Byzantine-robust aggregator for plaintext mode. Refused combinations
    are explained by `fedcrm.strategies.guardrails.check_combination`.
    """

    mode: AggregationMode = AggregationMode.PLAIN
    robust: RobustConfig = field(default_factory=RobustConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)


def parse_aggregation(section: Mapping[str, Any]) -> AggregationConfig:
    """Build the ``[aggregation]`` settings.

    Raises:
        ConfigError: A key is unknown or a value invalid.
    """
    _unknown(
        "aggregation",
        section,
        {"mode", "robust", "krum-malicious", "multi-krum-select", "trim-beta", *SECAGG_KEYS},
    )
    try:
        mode = AggregationMode(section.get("mode", "plain"))
        secagg = SecAggConfig.from_run_config(section)
        if mode is not AggregationMode.SECAGG and any(key in section for key in SECAGG_KEYS):
            raise ConfigError("secagg-* keys need mode = 'secagg'")
        robust = RobustConfig(
            aggregator=RobustAggregator(section.get("robust", "none")),
            num_malicious=int(section.get("krum-malicious", 1)),
            num_selected=int(section.get("multi-krum-select", 2)),
            trim_beta=float(section.get("trim-beta", 0.1)),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[aggregation]: {exc}") from exc
    return AggregationConfig(mode=mode, robust=robust, secagg=secagg)


@dataclass(frozen=True)
class ExperimentConfig:
    """One federated experiment: data set, branches, federation settings, baselines.

    ``dataset`` is ``telco``, ``mlc``, or ``synthetic:<schema>`` (``rows`` synthetic rows with
    that schema, for tests).
    """

    name: str
    dataset: str
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    rows: int = 600
    seed: int = 42
    cpus_per_branch: float = 1.0
    dp: FederatedDPConfig | None = None
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    """Aggregation mode (plain / HE) and robust aggregator (the ``[aggregation]`` table)."""
    """Record-level DP-SGD settings (the ``[dp]`` table); ``None``: no DP."""
    central_dp: CentralDPConfig | None = None
    """Branch-level central DP (the ``[central-dp]`` table); ``None``: none."""
    compliance: ConsentSetup | None = None
    """The run's declared purpose and simulated consent (``[compliance]``); ``None``: no gate."""

    @property
    def min_honest_branches(self) -> int:
        """Distributed DP's ``K_min``: ``min-honest-branches``, else ``min-train-nodes``."""
        central = self.central_dp
        if central is not None and central.min_honest_branches is not None:
            return central.min_honest_branches
        return self.federation.min_train_nodes

    @property
    def schema_name(self) -> str:
        """The schema the data set follows."""
        return self.dataset.removeprefix(SYNTHETIC_PREFIX)

    def __post_init__(self) -> None:
        if self.schema_name not in SCHEMAS:
            raise ConfigError(
                f"dataset must be one of {sorted(SCHEMAS)} or 'synthetic:<schema>', "
                f"got {self.dataset!r}"
            )
        if self.federation.schema != self.schema_name:
            raise ConfigError("federation.schema must match the dataset's schema")
        if self.dp is not None and self.federation.strategy is StrategyName.FEDPROX:
            raise ConfigError("[dp] cannot be used with strategy 'fedprox': use fedavg or fedadam")
        central = self.central_dp
        distributed = central is not None and central.mode is CentralDPMode.DISTRIBUTED
        check_combination(
            mode=self.aggregation.mode,
            robust=self.aggregation.robust.aggregator,
            strategy=str(self.federation.strategy),
            server_clipping=ServerClipping.NONE if central is None else central.server_clipping,
            central_dp=central is not None,
            distributed_dp=distributed,
        )
        if distributed and self.min_honest_branches > self.partition.num_branches:
            raise ConfigError(
                f"[central-dp] min-honest-branches (K_min = {self.min_honest_branches}, default "
                f"min-train-nodes) exceeds the {self.partition.num_branches} branches: no round "
                "could be released"
            )
        if self.aggregation.mode is AggregationMode.SECAGG and (
            self.dp is not None or self.compliance is not None
        ):
            raise ConfigError(
                "[dp] and [compliance] with mode 'secagg' are not supported yet: SecAgg+ "
                "replies carry no privacy report or round manifest for the ledger and the "
                "audit log; use mode 'plain' or 'he' with them"
            )
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ConfigError(
                f"name must be a non-empty word without slashes or spaces: {self.name!r}"
            )


def _section(raw: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table")
    return value


def _dp_key(toml_key: str) -> str:
    """``[dp]`` TOML key -> run-config key (``target-epsilon`` -> ``dp-target-epsilon``)."""
    for run_key in DP_RUN_CONFIG_KEYS:
        if run_key.removeprefix("dp-").removeprefix("privacy-") == toml_key:
            return run_key
    raise KeyError(toml_key)


def _dp_toml_keys() -> set[str]:
    return {key.removeprefix("dp-").removeprefix("privacy-") for key in DP_RUN_CONFIG_KEYS}


def parse_dp(section: Mapping[str, Any]) -> FederatedDPConfig:
    """Build the run's DP settings from the ``[dp]`` table.

    Raises:
        ConfigError: A key is unknown or a value is invalid (every problem listed).
    """
    _unknown("dp", section, _dp_toml_keys())
    if "target-epsilon" not in section:
        raise ConfigError("[dp] needs target-epsilon (the per-branch epsilon after all rounds)")
    dp = FederatedDPConfig.from_run_config({_dp_key(key): v for key, v in section.items()})
    if dp is None:  # target-epsilon = 0
        raise ConfigError("[dp] target-epsilon must be > 0 (remove [dp] to train without DP)")
    return dp


def _unknown(section: str, given: Mapping[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(given) - allowed)
    if extra:
        raise ConfigError(f"[{section}] has unknown key(s) {extra}; allowed: {sorted(allowed)}")


def parse_experiment(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Build an `ExperimentConfig` from parsed TOML, rejecting unknown keys.

    Raises:
        ConfigError: A key is unknown, a value has the wrong type or is out of range.
    """
    top = {
        "name",
        "dataset",
        "rows",
        "seed",
        "cpus-per-branch",
        "partition",
        "federation",
        "baselines",
        "dp",
        "central-dp",
        "aggregation",
        "compliance",
    }
    _unknown("top level", raw, top)
    for required in ("name", "dataset"):
        if required not in raw:
            raise ConfigError(f"missing top-level key {required!r}")
    dataset = str(raw["dataset"])
    if dataset.removeprefix(SYNTHETIC_PREFIX) not in SCHEMAS:
        raise ConfigError(
            f"dataset must be one of {sorted(SCHEMAS)} or 'synthetic:<schema>', got {dataset!r}"
        )
    seed = int(raw.get("seed", 42))

    part = _section(raw, "partition")
    _unknown("partition", part, {"kind", "num-branches", "column", "alpha", "min-branch-size"})
    try:
        partition = PartitionConfig(
            kind=PartitionKind(part.get("kind", "iid")),
            num_branches=int(part.get("num-branches", 10)),
            column=str(part.get("column", "state")),
            alpha=float(part.get("alpha", 0.5)),
            min_branch_size=int(part.get("min-branch-size", 30)),
        )
    except ValueError as exc:
        raise ConfigError(f"[partition]: {exc}") from exc

    fed = dict(_section(raw, "federation"))
    allowed = set(FederationConfig().to_run_config())
    _unknown("federation", fed, allowed)
    fed.setdefault("schema", dataset.removeprefix(SYNTHETIC_PREFIX))
    fed.setdefault("seed", seed)
    federation = FederationConfig.from_run_config(fed)

    base = _section(raw, "baselines")
    _unknown("baselines", base, {"enabled", "torch-epochs"})
    baselines = BaselineConfig(
        enabled=bool(base.get("enabled", True)), torch_epochs=int(base.get("torch-epochs", 30))
    )
    dp = None
    if "dp" in raw:
        try:
            dp = parse_dp(_section(raw, "dp"))
        except ConfigError as exc:
            raise ConfigError(f"[dp]: {exc}") from exc
    central_dp = None
    if "central-dp" in raw:
        central_dp = parse_central_dp(_section(raw, "central-dp"))
    compliance = None
    if "compliance" in raw:
        compliance = parse_compliance(_section(raw, "compliance"))
    return ExperimentConfig(
        compliance=compliance,
        dp=dp,
        central_dp=central_dp,
        aggregation=parse_aggregation(_section(raw, "aggregation")),
        name=str(raw["name"]),
        dataset=dataset,
        partition=partition,
        federation=federation,
        baselines=baselines,
        rows=int(raw.get("rows", 600)),
        seed=seed,
        cpus_per_branch=float(raw.get("cpus-per-branch", 1.0)),
    )


def load_experiment(path: Path) -> ExperimentConfig:
    """Read and validate an experiment TOML file.

    Raises:
        ConfigError: The file is missing, not valid TOML, or has invalid settings.
    """
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return parse_experiment(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def to_toml_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The fully resolved configuration, in the same shape as the input TOML."""
    return {
        "name": cfg.name,
        "dataset": cfg.dataset,
        "rows": cfg.rows,
        "seed": cfg.seed,
        "cpus-per-branch": cfg.cpus_per_branch,
        "partition": {
            "kind": str(cfg.partition.kind),
            "num-branches": cfg.partition.num_branches,
            "column": cfg.partition.column,
            "alpha": cfg.partition.alpha,
            "min-branch-size": cfg.partition.min_branch_size,
        },
        "federation": cfg.federation.to_run_config(),
        "baselines": {"enabled": cfg.baselines.enabled, "torch-epochs": cfg.baselines.torch_epochs},
        **({} if cfg.dp is None else {"dp": dp_toml(cfg.dp)}),
        **({} if cfg.central_dp is None else {"central-dp": central_dp_toml(cfg.central_dp)}),
        **({} if cfg.compliance is None else {"compliance": compliance_toml(cfg.compliance)}),
        "aggregation": {
            "mode": str(cfg.aggregation.mode),
            "robust": str(cfg.aggregation.robust.aggregator),
            "krum-malicious": cfg.aggregation.robust.num_malicious,
            "multi-krum-select": cfg.aggregation.robust.num_selected,
            "trim-beta": cfg.aggregation.robust.trim_beta,
            **(
                cfg.aggregation.secagg.to_run_config()
                if cfg.aggregation.mode is AggregationMode.SECAGG
                else {}
            ),
        },
    }


def dp_toml(dp: FederatedDPConfig) -> dict[str, float | str]:
    """The ``[dp]`` table of resolved DP settings (unset values left out)."""
    return {
        key.removeprefix("dp-").removeprefix("privacy-"): value
        for key, value in dp.to_run_config().items()
    }
