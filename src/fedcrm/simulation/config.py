"""Experiment configuration: a TOML file naming the task, the data, the branches and the federation.

Example (``examples/mlc_by_state.toml``)::

    name = "mlc-by-state"
    dataset = "mlc"           # task = "churn" unless named (task = "recommendation")

    [partition]
    kind = "natural"
    column = "state"

    [federation]              # the federation's keys and the task's own settings
    num-rounds = 30
    strategy = "fedavg"

    [dp]                      # optional: DP-SGD on every branch
    target-epsilon = 3.0      # per branch, after all planned rounds

The core owns ``task``, ``name``, ``seed``, ``cpus-per-branch`` and the tables
``[federation]`` (with the task's settings), ``[dp]`` (with the task's DP options),
``[central-dp]``, ``[aggregation]`` and ``[compliance]``; every other key or table belongs to
the task's experiment (`fedcrm.tasks.TaskExperiment.spec_type`: ``dataset``, ``[partition]``,
``[synthetic]``, ``[baselines]`` ...). Unknown keys are refused, every problem is named.
"""

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from fedcrm.exceptions import ConfigError
from fedcrm.privacy import (
    DPSGD_RUN_CONFIG_KEYS,
    CentralDPConfig,
    DPSGDConfig,
    central_dp_toml,
    parse_central_dp,
)
from fedcrm.server.config import FederationConfig
from fedcrm.server.wiring import AggregationConfig, check_plan
from fedcrm.settings import from_mapping, keys, to_mapping
from fedcrm.simulation.consent_setup import ConsentSetup, compliance_toml, parse_compliance
from fedcrm.tasks import Task, get_task
from fedcrm.tasks.registry import DEFAULT_TASK

PRIVACY_STORE: Final = "privacy-store"
"""``[dp]`` key: the folder of the virtual branches' accountants across runs."""
CORE_KEYS: Final = frozenset({"task", "name", "seed", "cpus-per-branch"})
CORE_TABLES: Final = frozenset({"federation", "dp", "central-dp", "aggregation", "compliance"})


@dataclass(frozen=True)
class ExperimentConfig:
    """One federated experiment of a registered task.

    Attributes:
        name: Run name (one word).
        task: The task (`fedcrm.tasks.TASKS`).
        spec: The task's experiment keys (data set, branches, baselines).
        federation: The federation's settings.
        settings: The task's settings.
        seed: Seed of the data generation, the partition and (by default) the federation.
        cpus_per_branch: Ray CPUs per simulated branch.
        dp: DP-SGD on every branch (``[dp]``); ``None``: no DP.
        privacy_store: ``[dp] privacy-store``: a folder holding every virtual branch's
            accountants across runs (``<store>/<branch>/``); ``None``: each run's branches
            start at ε = 0 in their own folders.
        central_dp: Branch-level central DP (``[central-dp]``); ``None``: none.
        aggregation: Aggregation mode and robust aggregator (``[aggregation]``).
        compliance: The run's declared purpose and simulated consent (``[compliance]``);
            ``None``: no consent gate.
    """

    name: str
    task: str
    spec: Any
    federation: FederationConfig
    settings: Any
    seed: int = 42
    cpus_per_branch: float = 1.0
    dp: DPSGDConfig | None = None
    privacy_store: Path | None = None
    central_dp: CentralDPConfig | None = None
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    compliance: ConsentSetup | None = None

    @property
    def plugin(self) -> Task[Any, Any]:
        """The registered task."""
        return get_task(self.task)

    @property
    def min_honest_branches(self) -> int:
        """Distributed DP's ``K_min``: ``min-honest-branches``, else ``min-train-nodes``."""
        central = self.central_dp
        if central is not None and central.min_honest_branches is not None:
            return central.min_honest_branches
        return self.federation.min_train_nodes

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ConfigError(
                f"name must be a non-empty word without slashes or spaces: {self.name!r}"
            )
        if not self.cpus_per_branch > 0:
            raise ConfigError(f"cpus-per-branch must be > 0, got {self.cpus_per_branch}")
        if self.dp is not None and self.federation.strategy == "fedprox":
            raise ConfigError("[dp] cannot be used with strategy 'fedprox': use fedavg or fedadam")
        check_plan(
            self.aggregation,
            self.central_dp,
            strategy=str(self.federation.strategy),
            dp=self.dp is not None,
            consent=self.compliance is not None,
        )


def _table(raw: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table")
    return dict(value)


def _dp_toml_key(run_key: str) -> str:
    """Run-config key -> ``[dp]`` key (``dp-target-epsilon`` -> ``target-epsilon``)."""
    return run_key.removeprefix("dp-").removeprefix("privacy-")


def parse_dp(section: Mapping[str, Any], task: Task[Any, Any]) -> DPSGDConfig:
    """Build the run's DP-SGD settings from the ``[dp]`` table (the task's options removed).

    Raises:
        ConfigError: A key is unknown or a value is invalid (every problem listed).
    """
    by_toml = {_dp_toml_key(key): key for key in DPSGD_RUN_CONFIG_KEYS}
    unknown = sorted(set(section) - set(by_toml))
    if unknown:
        allowed = sorted({*by_toml, *task.dp_keys, PRIVACY_STORE})
        raise ConfigError(f"[dp] has unknown key(s) {unknown}; allowed: {allowed}")
    if "target-epsilon" not in section:
        raise ConfigError("[dp] needs target-epsilon (the per-branch epsilon after all rounds)")
    try:
        dp = DPSGDConfig.from_run_config(
            {by_toml[key]: v for key, v in section.items()},
            model=task.model_name,
            purpose=task.purpose,
        )
    except ConfigError as exc:
        raise ConfigError(f"[dp]: {exc}") from exc
    if dp is None:  # target-epsilon = 0
        raise ConfigError("[dp] target-epsilon must be > 0 (remove [dp] to train without DP)")
    return dp


def parse_experiment(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Build an `ExperimentConfig` from parsed TOML, rejecting unknown keys.

    Raises:
        ConfigError: A key is unknown, a value has the wrong type or is out of range.
    """
    task = get_task(str(raw.get("task", DEFAULT_TASK)))
    if "name" not in raw:
        raise ConfigError("missing top-level key 'name'")
    experiment = task.experiment
    spec = experiment.spec(
        {key: v for key, v in raw.items() if key not in CORE_KEYS | CORE_TABLES},
        where=f"{task.name} experiment",
    )
    seed = raw.get("seed", 42)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be a whole number, got {seed!r}")
    fed = _table(raw, "federation")
    core_keys = keys(FederationConfig) - {"task"}
    task_keys = keys(task.settings_type) - task.dp_keys  # the task's [dp] options go in [dp]
    unknown = sorted(set(fed) - core_keys - task_keys)
    if unknown:
        allowed = sorted(core_keys | task_keys)
        raise ConfigError(f"[federation] has unknown key(s) {unknown}; allowed: {allowed}")
    federation = from_mapping(
        FederationConfig,
        {"seed": seed, **{key: v for key, v in fed.items() if key in core_keys}, "task": task.name},
        where="[federation]",
    )
    dp_table = _table(raw, "dp")
    task_values = {key: v for key, v in fed.items() if key in task_keys}
    task_values.update({key: v for key, v in dp_table.items() if key in task.dp_keys})
    settings = task.settings(
        task_values,
        where="[federation] and [dp]" if task.dp_keys & set(dp_table) else "[federation]",
        strict=True,
        defaults=experiment.settings_defaults(spec),
    )
    dp = None
    store = dp_table.pop(PRIVACY_STORE, None)
    if store is not None and (not isinstance(store, str) or not store.strip()):
        raise ConfigError(f"[dp] {PRIVACY_STORE} must be a folder path, got {store!r}")
    if "dp" in raw:
        dp = parse_dp({key: v for key, v in dp_table.items() if key not in task.dp_keys}, task)
    central_dp = None
    if "central-dp" in raw:
        central_dp = parse_central_dp(
            _table(raw, "central-dp"), model=task.model_name, purpose=task.purpose
        )
    compliance = parse_compliance(_table(raw, "compliance")) if "compliance" in raw else None
    return ExperimentConfig(
        name=str(raw["name"]),
        task=task.name,
        spec=spec,
        federation=federation,
        settings=experiment.check(spec, settings),
        seed=seed,
        cpus_per_branch=float(raw.get("cpus-per-branch", 1.0)),
        dp=dp,
        privacy_store=None if store is None else Path(store).expanduser().resolve(),
        central_dp=central_dp,
        aggregation=AggregationConfig.from_table(_table(raw, "aggregation")),
        compliance=compliance,
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
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return parse_experiment(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def to_toml_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The fully resolved configuration, in the same shape as the input TOML."""
    task = cfg.plugin
    settings = to_mapping(cfg.settings)
    federation = {key: v for key, v in cfg.federation.to_run_config().items() if key != "task"}
    out: dict[str, Any] = {
        "task": cfg.task,
        "name": cfg.name,
        "seed": cfg.seed,
        "cpus-per-branch": cfg.cpus_per_branch,
        **to_mapping(cfg.spec),
        "federation": {
            **federation,
            **{key: v for key, v in settings.items() if key not in task.dp_keys},
        },
        "aggregation": cfg.aggregation.to_table(),
    }
    if cfg.dp is not None:
        out["dp"] = {
            **{_dp_toml_key(key): v for key, v in cfg.dp.to_run_config().items()},
            **{key: v for key, v in settings.items() if key in task.dp_keys},
            **({} if cfg.privacy_store is None else {PRIVACY_STORE: str(cfg.privacy_store)}),
        }
    if cfg.central_dp is not None:
        out["central-dp"] = central_dp_toml(cfg.central_dp)
    if cfg.compliance is not None:
        out["compliance"] = compliance_toml(cfg.compliance)
    return out
