"""Shared by the in-process churn benches: an example's branches, as the product cuts them.

`prepare` writes the example's branch exports with the churn task's experiment
(``TaskExperiment.prepare``, as ``fedcrm simulate`` does), reads every branch back through the
task (``Task.load``: the ClientApp's code), computes the federated scaler from the branches'
statistics (``Task.statistics`` / ``combine_statistics``, as the server's statistics query
does) and encodes the pooled validation and test rows once, for exact pooled ROC-AUC.
"""

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from flwr.app import MetricRecord, RecordDict

from fedcrm import wire as k
from fedcrm.data.preprocess import Scaler, encode
from fedcrm.data.schema import ChurnSchema, get_schema
from fedcrm.models.churn import model_from_state, predict_proba
from fedcrm.simulation import ExperimentConfig, load_experiment
from fedcrm.tasks import Arrays, BranchSource, RoundContext, SimulatedBranch, Task


@dataclass
class Rows:
    """Encoded rows and labels."""

    x: np.ndarray
    y: np.ndarray


@dataclass
class ChurnFederation:
    """An example's branches read back as their ClientApps read them, and the pooled rows."""

    cfg: ExperimentConfig
    settings: Any  # the churn task's settings (with the overrides)
    schema: ChurnSchema
    branches: list[SimulatedBranch]
    data: list[Any]  # each branch's data as `Task.load` returns it (its split in ``.split``)
    statistics: dict[str, Any]  # what every message carries (the federated scaler)
    scaler: Scaler
    train: Rows
    val: Rows
    test: Rows
    workdir: Path

    @property
    def task(self) -> Task[Any, Any]:
        """The churn task."""
        return self.cfg.plugin

    @property
    def names(self) -> list[str]:
        """The branches' names (ledger, accountants)."""
        return [b.name for b in self.branches]

    def context(self, pid: int, server_round: int, *, seed: int, state: RecordDict) -> RoundContext:
        """Branch ``pid``'s view of a round, as its ClientApp builds it (seed mixed the same)."""
        return RoundContext(
            server_round=server_round,
            seed=seed + 1000 * server_round + pid % 1000,
            run_seed=self.cfg.federation.seed,
            config=self.statistics,
            state=state,
            folder=self.branches[pid].folder,
        )

    def initial(self) -> Arrays:
        """The seeded round-0 model."""
        return self.task.initial_arrays(self.settings, seed=self.cfg.federation.seed)


def torch_state(arrays: Arrays) -> dict[str, torch.Tensor]:
    """Named arrays as a torch state dict."""
    return {name: torch.from_numpy(np.array(a)) for name, a in arrays.items()}


def roc_auc(arrays: Arrays, rows: Rows) -> float:
    """Exact ROC-AUC of the model ``arrays`` on ``rows``."""
    from sklearn.metrics import roc_auc_score

    return float(
        roc_auc_score(rows.y, predict_proba(model_from_state(torch_state(arrays)), rows.x))
    )


def prepare(example: Path, workdir: Path, overrides: dict[str, Any]) -> ChurnFederation:
    """The example's branches under ``workdir``, with ``overrides`` of federation or task keys.

    Args:
        example: An example experiment TOML of the churn task.
        workdir: A fresh folder (the run directory).
        overrides: Snake-case fields of `FederationConfig` or of the task's settings.
    """
    cfg = load_experiment(example)
    task = cfg.plugin
    federation_keys = {f.name for f in fields(cfg.federation)}
    cfg = replace(
        cfg,
        federation=replace(
            cfg.federation, **{n: v for n, v in overrides.items() if n in federation_keys}
        ),
    )
    settings = replace(
        cfg.settings, **{n: v for n, v in overrides.items() if n not in federation_keys}
    )
    workdir.mkdir(parents=True)
    simulated = task.experiment.prepare(cfg.spec, settings, workdir, seed=cfg.seed)
    data = [
        task.load(
            BranchSource(folder=b.folder, name=b.name, number=b.partition_id),
            settings,
            seed=cfg.federation.seed,
        )
        for b in simulated.branches
    ]
    statistics = dict(
        task.combine_statistics(
            settings, [MetricRecord(task.statistics(d, settings)) for d in data]
        )
    )
    scaler = Scaler(
        np.asarray(statistics[k.KEY_SCALER_MEAN], dtype=np.float64),
        np.asarray(statistics[k.KEY_SCALER_STD], dtype=np.float64),
    )
    schema = get_schema(settings.schema)

    def pooled(part: str) -> Rows:
        frame = pd.concat([getattr(d.split, part) for d in data], ignore_index=True)
        return Rows(*encode(frame, schema, scaler))

    return ChurnFederation(
        cfg,
        settings,
        schema,
        simulated.branches,
        data,
        statistics,
        scaler,
        pooled("train"),
        pooled("val"),
        pooled("test"),
        workdir,
    )
