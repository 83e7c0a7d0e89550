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
"""

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcrm.data.partition import PartitionKind
from fedcrm.data.schema import SCHEMAS
from fedcrm.exceptions import ConfigError
from fedcrm.server.config import FederationConfig

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
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ConfigError(
                f"name must be a non-empty word without slashes or spaces: {self.name!r}"
            )


def _section(raw: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table")
    return value


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
    return ExperimentConfig(
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
    }
