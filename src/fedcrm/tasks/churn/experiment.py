"""A simulated churn experiment: branch exports cut from real or synthetic data, and baselines.

The researcher's process holds the pooled data only to cut it into branch exports and, after
the run, to score the released model and train the centralised baselines on exactly the same
split; the federated model is trained by the branches' ClientApps from their own exports.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
import torch

from fedcrm.data.check import coerce_frame
from fedcrm.data.loaders import load_dataset
from fedcrm.data.partition import PartitionKind, partition_indices
from fedcrm.data.preprocess import Scaler, encode
from fedcrm.data.pseudonymise import load_or_create_key, pseudonymise_series
from fedcrm.data.schema import SCHEMAS, ChurnSchema, get_schema
from fedcrm.data.split import Split
from fedcrm.data.synthetic import synthetic_export
from fedcrm.exceptions import ConfigError
from fedcrm.models.churn import model_from_state, predict_proba
from fedcrm.models.metrics import exact_metrics
from fedcrm.seeds import Stream, integer
from fedcrm.tasks.base import (
    FinishedRun,
    SimulatedBranch,
    SimulatedFederation,
    TaskExperiment,
    TaskOutcome,
)
from fedcrm.tasks.churn import branch
from fedcrm.tasks.churn.baselines import PooledData, run_baselines
from fedcrm.tasks.churn.settings import ChurnSettings
from fedcrm.tasks.churn.task import scaler_from

SYNTHETIC_PREFIX: Final = "synthetic:"
KEY_FILE: Final = "hmac.key"
"""A simulated branch's HMAC key (0600), in its folder."""
_COLUMNS: Final = ("roc_auc", "pr_auc", "f1", "log_loss")


def branch_dir(root: Path, partition_id: int) -> Path:
    """Folder of simulated branch number ``partition_id`` under a run's ``branches/``."""
    return root / f"{partition_id:03d}"


@dataclass(frozen=True)
class PartitionConfig:
    """How the pooled data is split into virtual branches (``[partition]``)."""

    kind: PartitionKind = PartitionKind.IID
    num_branches: int = 10
    column: str = "state"
    alpha: float = 0.5
    min_branch_size: int = 30


@dataclass(frozen=True)
class ChurnBaselines:
    """Centralised baselines on the pooled training rows of the same split (``[baselines]``)."""

    enabled: bool = True
    torch_epochs: int = 30


@dataclass(frozen=True)
class ChurnSpec:
    """The churn task's experiment keys.

    Attributes:
        dataset: ``telco``, ``mlc``, or ``synthetic:<schema>`` (``rows`` synthetic customers
            with that schema, for tests).
        rows: Synthetic customers.
        partition: How the rows are cut into branches.
        baselines: The centralised baselines.
    """

    dataset: str
    rows: int = 600
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    baselines: ChurnBaselines = field(default_factory=ChurnBaselines)

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


def load_pooled(spec: ChurnSpec, *, seed: int) -> tuple[ChurnSchema, pd.DataFrame]:
    """The pooled data set named by the experiment (real or synthetic), coerced to its schema."""
    if spec.dataset.startswith(SYNTHETIC_PREFIX):
        schema = get_schema(spec.schema_name)
        rows = synthetic_export(schema, spec.rows, seed=integer(seed, Stream.SYNTHETIC))
        return schema, coerce_frame(rows, schema)
    return load_dataset(spec.dataset)


def write_branches(spec: ChurnSpec, run_dir: Path, *, seed: int) -> list[SimulatedBranch]:
    """Partition the pooled data and write one pseudonymised export per branch."""
    schema, pooled = load_pooled(spec, seed=seed)
    p = spec.partition
    parts = partition_indices(
        pooled,
        kind=p.kind,
        num_branches=p.num_branches,
        column=p.column,
        label=schema.label,
        alpha=p.alpha,
        min_branch_size=p.min_branch_size,
        seed=seed,
    )
    branches = []
    for pid, part in enumerate(parts):
        folder = branch_dir(run_dir / "branches", pid)
        frame = pooled.iloc[part.indices].reset_index(drop=True)
        key = load_or_create_key(folder / KEY_FILE)
        frame[schema.id_column] = pseudonymise_series(frame[schema.id_column], key)
        branch.write_export(frame, schema, folder / branch.EXPORT_FILE)
        info = {
            "partition_id": pid,
            "name": part.branch,
            "rows": len(frame),
            "churn_share": float(frame[schema.label].mean()),
        }
        (folder / "branch.json").write_text(json.dumps(info, indent=2))
        branches.append(SimulatedBranch(pid, part.branch, folder, info))
    return branches


def read_split(folder: Path, schema: ChurnSchema, *, seed: int) -> Split:
    """A simulated branch's split, read back exactly as its ClientApp reads it."""
    return branch.BranchData(folder / branch.EXPORT_FILE).load(schema, seed=seed)


def pool(splits: list[Split], schema: ChurnSchema, scaler: Scaler) -> PooledData:
    """The pooled, encoded rows of every branch's split parts."""

    def enc(frames: list[pd.DataFrame]) -> tuple[np.ndarray, np.ndarray]:
        return encode(pd.concat(frames, ignore_index=True), schema, scaler)

    x_tr, y_tr = enc([s.train for s in splits])
    x_va, y_va = enc([s.val for s in splits])
    x_te, y_te = enc([s.test for s in splits])
    return PooledData(x_tr, y_tr, x_va, y_va, x_te, y_te)


def _row(name: str, m: Mapping[str, Any]) -> str:
    return f"| {name} | " + " | ".join(f"{float(m[c]):.4f}" for c in _COLUMNS) + " |"


class ChurnExperiment(TaskExperiment[ChurnSpec, ChurnSettings]):
    """Churn exports partitioned by region, Dirichlet label skew or IID; pooled baselines."""

    spec_type = ChurnSpec

    def settings_defaults(self, spec: ChurnSpec) -> dict[str, object]:
        """The schema is the data set's."""
        return {"schema": spec.schema_name}

    def check(self, spec: ChurnSpec, settings: ChurnSettings) -> ChurnSettings:
        """The settings' schema is the data set's.

        Raises:
            ConfigError: ``[federation] schema`` names another schema.
        """
        if settings.schema != spec.schema_name:
            raise ConfigError("federation.schema must match the dataset's schema")
        return settings

    def prepare(
        self, spec: ChurnSpec, settings: ChurnSettings, run_dir: Path, *, seed: int
    ) -> SimulatedFederation:
        """One pseudonymised export, HMAC key and ``branch.json`` per branch."""
        return SimulatedFederation(write_branches(spec, run_dir, seed=seed), handle=None)

    def customers(
        self,
        federation: SimulatedFederation,
        sim: SimulatedBranch,
        settings: ChurnSettings,
        *,
        seed: int,
    ) -> list[str]:
        """The branch's customers in the order of its export."""
        column = get_schema(settings.schema).id_column
        return [str(c) for c in pd.read_parquet(sim.folder / branch.EXPORT_FILE)[column]]

    def subjects(
        self,
        federation: SimulatedFederation,
        sim: SimulatedBranch,
        settings: ChurnSettings,
        *,
        seed: int,
    ) -> dict[str, list[str]]:
        """The customers of each part of the branch's split (pseudonyms, as in its export)."""
        schema = get_schema(settings.schema)
        return branch.ChurnData(read_split(sim.folder, schema, seed=seed), schema).subjects()

    def finish(self, run: FinishedRun[ChurnSpec, ChurnSettings]) -> TaskOutcome:
        """Score the released model on the pooled rows; train the baselines on the same rows."""
        settings = run.settings
        schema = get_schema(settings.schema)
        splits = []
        for sim in run.federation.branches:
            data = branch.ChurnData(read_split(sim.folder, schema, seed=run.seed), schema)
            if run.kept is not None:
                data = data.keep(run.kept[sim.partition_id])
            splits.append(data.split)
        pooled = pool(splits, schema, scaler_from(run.statistics))
        model = model_from_state({n: torch.from_numpy(np.array(a)) for n, a in run.arrays.items()})
        federated = exact_metrics(
            pooled.y_val,
            predict_proba(model, pooled.x_val),
            pooled.y_test,
            predict_proba(model, pooled.x_test),
        )
        centralised = {}
        if run.spec.baselines.enabled:
            train = settings.train_settings(epochs=run.spec.baselines.torch_epochs)
            found = run_baselines(pooled, train, seed=run.seed, hidden=settings.hidden)
            centralised = {name: m.as_dict() for name, m in found.items()}
        fed = federated.as_dict()
        sizes = [b.info["rows"] for b in run.federation.branches]
        rows = {"train": len(pooled.y_train), "val": len(pooled.y_val), "test": len(pooled.y_test)}
        report = [
            f"Data set `{run.spec.dataset}`, {len(sizes)} branches ({min(sizes)}–{max(sizes)} "
            f"customers each); rows train/val/test {rows['train']}/{rows['val']}/{rows['test']}.",
            "",
            "Every model is scored on the same pooled test rows; the F1 threshold is tuned on the",
            "pooled validation rows. The federated model is the round with the best pooled "
            "validation",
            "ROC-AUC; the pooled torch baseline stops early on the same validation rows.",
            "",
            "| model | ROC-AUC | PR-AUC | F1 | log loss |",
            "|---|---|---|---|---|",
            _row(f"federated (round {run.best_round}, chosen on validation)", fed),
            *(_row(f"centralised {name}", m) for name, m in centralised.items()),
            "",
        ]
        last = run.rounds[-1] if run.rounds else {}
        if last:
            lo, hi, sd = (float(last.get(f"branch-auc-{s}", "nan")) for s in ("min", "max", "std"))
            report += [
                f"Branch spread of test ROC-AUC in the last round: min {lo:.3f}, max {hi:.3f}, "
                f"std {sd:.3f} (branches with a single class in their test rows excluded).",
                "",
            ]
        return TaskOutcome(
            summary={
                "dataset": run.spec.dataset,
                "rows": rows,
                "federated": {
                    **fed,
                    "evaluated_on": (
                        "pooled test rows of every branch (exact)"
                        if run.kept is None
                        else "pooled test rows with valid consent at the run's end (exact)"
                    ),
                },
                "centralised": centralised,
            },
            report=report,
            plot=[float(r.get("roc-auc", float("nan"))) for r in run.rounds],
            centralised={name: float(m["roc_auc"]) for name, m in centralised.items()},
        )
