"""Recommendation experiment configuration: a TOML file with ``task = "recommendation"``.

Example (``examples/movielens_zip.toml``)::

    task = "recommendation"
    name = "movielens-zip"
    dataset = "movielens-100k"

    [federation]
    num-rounds = 30
    local-epochs = 2

``dataset = "synthetic"`` generates group-structured interactions (`[synthetic]` table) for
tests and demos; ``movielens-100k`` reads the installed ``recbole`` package files, with one
branch per US ZIP zone.

``[aggregation] mode = "he"`` (``examples/movielens_zip_he.toml``) sums CKKS-encrypted
item-tower updates on the server (keys created in the run directory, as for churn); ``mode`` is
the table's only key for recommendations (`parse_rec_aggregation` says why the others are
refused). It combines with the customer-level ``[dp]`` table: each branch privatises its item
update, then encrypts it.
"""

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Literal

from fedcrm.exceptions import ConfigError
from fedcrm.server.rec_federation import RecDPConfig, RecFederationConfig
from fedcrm.strategies.guardrails import AggregationMode

TASK: Final = "recommendation"
RecDataset = Literal["movielens-100k", "synthetic"]
DATASETS: Final[tuple[str, ...]] = ("movielens-100k", "synthetic")


@dataclass(frozen=True)
class SyntheticRecConfig:
    """Synthetic interactions (`fedcrm.data.interactions.synthetic_interactions`).

    Attributes:
        users: Users with history.
        items: Catalogue size (at least 100 + ``max_per_user``, for 99 sampled negatives).
        branches: Branches (1-11); users are assigned with uneven shares.
        groups: Taste groups.
        min_per_user: Fewest distinct items per user.
        max_per_user: Most distinct items per user.
        cold_customers: Extra customers per branch with no history at all.
    """

    users: int = 120
    items: int = 150
    branches: int = 3
    groups: int = 4
    min_per_user: int = 8
    max_per_user: int = 24
    cold_customers: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.branches <= 11:
            raise ConfigError(f"[synthetic] branches must lie in [1, 11], got {self.branches}")
        if self.users < self.branches or self.groups < 1 or self.cold_customers < 0:
            raise ConfigError("[synthetic] needs users >= branches, groups >= 1, cold >= 0")
        if not 3 <= self.min_per_user <= self.max_per_user:
            raise ConfigError("[synthetic] needs 3 <= min-per-user <= max-per-user")
        if self.items < 100 + self.max_per_user:
            raise ConfigError(f"[synthetic] items must be >= 100 + max-per-user, got {self.items}")


@dataclass(frozen=True)
class RecBaselineConfig:
    """Centralised baselines on the same split: popularity, item-kNN and MF.

    Attributes:
        enabled: Train them.
        mf_epochs: Epochs of the centralised MF (early-stopped on validation).
        knn_neighbours: Item-kNN neighbourhood (0: all items).
    """

    enabled: bool = True
    mf_epochs: int = 15
    knn_neighbours: int = 0

    def __post_init__(self) -> None:
        if self.mf_epochs < 1 or self.knn_neighbours < 0:
            raise ConfigError("[baselines] needs mf-epochs >= 1 and knn-neighbours >= 0")


@dataclass(frozen=True)
class RecExperimentConfig:
    """One federated recommendation experiment.

    Attributes:
        name: Run name (one word).
        dataset: ``movielens-100k`` or ``synthetic``.
        federation: Federation settings.
        synthetic: Synthetic data settings (``dataset = "synthetic"``).
        baselines: Centralised baselines.
        dp: Customer-level DP-SGD on every branch's item-tower update (``[dp]``; ``None``:
            no DP).
        aggregation: ``plain`` (FedAvg over plaintext item arrays) or ``he`` (the server adds
            CKKS ciphertexts of the branches' item updates; `fedcrm.strategies.he`).
        seed: Seed of the data generation and the sampled negatives.
        negatives_dir: Where the fixed negatives file of a real data set lives (default
            ``~/.cache/fedcrm``; never inside the repository).
        cpus_per_branch: Ray CPUs per simulated branch.
    """

    name: str
    dataset: RecDataset
    federation: RecFederationConfig = field(default_factory=RecFederationConfig)
    synthetic: SyntheticRecConfig = field(default_factory=SyntheticRecConfig)
    baselines: RecBaselineConfig = field(default_factory=RecBaselineConfig)
    dp: RecDPConfig | None = None
    aggregation: AggregationMode = AggregationMode.PLAIN
    seed: int = 0
    negatives_dir: Path | None = None
    cpus_per_branch: float = 1.0

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset must be one of {list(DATASETS)}, got {self.dataset!r}")
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ConfigError(f"name must be one word without slashes: {self.name!r}")
        if not self.cpus_per_branch > 0:
            raise ConfigError(f"cpus-per-branch must be > 0, got {self.cpus_per_branch}")
        if self.aggregation not in _REC_MODES:
            raise ConfigError(_mode_refusal(str(self.aggregation)))
        object.__setattr__(self, "aggregation", AggregationMode(self.aggregation))


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _table(cls: type[Any], raw: Any, section: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{section}] must be a table")
    names = {_kebab(f.name): f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names.keys())
    if unknown:
        raise ConfigError(f"[{section}] has unknown key(s) {unknown}; allowed: {sorted(names)}")
    try:
        return cls(**{names[key]: value for key, value in raw.items()})
    except TypeError as exc:
        raise ConfigError(f"[{section}]: {exc}") from exc


_REC_MODES: Final = (AggregationMode.PLAIN, AggregationMode.HE)


def _mode_refusal(mode: str) -> str:
    if mode == AggregationMode.SECAGG:
        return (
            "[aggregation] mode = 'secagg' is not supported for recommendations: Flower's "
            "SecAgg+ runs only on the legacy workflow API, which the recommendation round loop "
            "does not use. Instead: mode = 'he' (CKKS; the server only adds ciphertexts)"
        )
    return (
        f"[aggregation] mode must be one of {[str(m) for m in _REC_MODES]} for "
        f"recommendations, got {mode!r}"
    )


def parse_rec_aggregation(raw: Any) -> AggregationMode:
    """The ``[aggregation]`` table of a recommendation experiment: ``mode`` only.

    Raises:
        ConfigError: Not a table, a key other than ``mode`` (robust aggregators and SecAgg+
            settings are churn-only: see the message), or a mode other than plain / he.
    """
    if not isinstance(raw, dict):
        raise ConfigError("[aggregation] must be a table")
    other = sorted(set(raw) - {"mode"})
    if other:
        raise ConfigError(
            f"[aggregation] of a recommendation experiment takes only 'mode', got {other}: "
            "robust aggregators (Krum, median, trimmed mean) and SecAgg+ settings are not "
            "available for recommendations (under HE the server could not apply them anyway: "
            "it holds only ciphertexts)"
        )
    mode = raw.get("mode", "plain")
    if not isinstance(mode, str) or mode not in [str(m) for m in _REC_MODES]:
        raise ConfigError(_mode_refusal(str(mode)))
    return AggregationMode(mode)


def parse_rec_experiment(raw: Mapping[str, Any]) -> RecExperimentConfig:
    """Build a `RecExperimentConfig` from parsed TOML, rejecting unknown keys.

    Raises:
        ConfigError: ``task`` is not ``"recommendation"``, a key is unknown or a value invalid.
    """
    if raw.get("task") != TASK:
        raise ConfigError(f'a recommendation experiment needs task = "{TASK}"')
    top = {"task", "name", "dataset", "seed", "negatives-dir", "cpus-per-branch"}
    tables = {"federation", "synthetic", "baselines", "dp", "aggregation"}
    unknown = sorted(set(raw) - top - tables)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}; allowed: {sorted(top | tables)}")
    for key in ("name", "dataset"):
        if not isinstance(raw.get(key), str):
            raise ConfigError(f"{key} must be a string")
    negatives_dir = raw.get("negatives-dir")
    return RecExperimentConfig(
        name=raw["name"],
        dataset=raw["dataset"],
        federation=_table(RecFederationConfig, raw.get("federation", {}), "federation"),
        synthetic=_table(SyntheticRecConfig, raw.get("synthetic", {}), "synthetic"),
        baselines=_table(RecBaselineConfig, raw.get("baselines", {}), "baselines"),
        dp=_table(RecDPConfig, raw["dp"], "dp") if "dp" in raw else None,
        aggregation=parse_rec_aggregation(raw.get("aggregation", {})),
        seed=int(raw.get("seed", 0)),
        negatives_dir=Path(negatives_dir) if negatives_dir else None,
        cpus_per_branch=float(raw.get("cpus-per-branch", 1.0)),
    )


def load_rec_experiment(path: Path) -> RecExperimentConfig:
    """Read and validate a recommendation experiment TOML.

    Raises:
        ConfigError: The file cannot be read or parsed, or is invalid.
    """
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return parse_rec_experiment(raw)


def _as_toml(obj: Any) -> dict[str, Any]:
    return {_kebab(f.name): getattr(obj, f.name) for f in fields(obj)}


def rec_to_toml_dict(cfg: RecExperimentConfig) -> dict[str, Any]:
    """Return the resolved configuration as TOML-ready data (round-trips through the parser)."""
    out: dict[str, Any] = {
        "task": TASK,
        "name": cfg.name,
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "cpus-per-branch": cfg.cpus_per_branch,
    }
    if cfg.negatives_dir is not None:
        out["negatives-dir"] = str(cfg.negatives_dir)
    out["federation"] = _as_toml(cfg.federation)
    out["synthetic"] = _as_toml(cfg.synthetic)
    out["baselines"] = _as_toml(cfg.baselines)
    if cfg.dp is not None:
        out["dp"] = {key: value for key, value in _as_toml(cfg.dp).items() if value is not None}
    if cfg.aggregation is not AggregationMode.PLAIN:
        out["aggregation"] = {"mode": str(cfg.aggregation)}
    return out
