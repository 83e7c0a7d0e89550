"""Fixtures every test folder shares: Flower's task identity, one torch thread, a federation.

``federation`` builds a small simulated federation of either task on an in-process grid (the
real ServerApp loop and ClientApp, no Ray); tests of shared behaviour parametrise over
``TASK_IDS``.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.clientapp import ClientApp

from fedcrm.client import make_client_app
from fedcrm.server import FederationConfig
from fedcrm.simulation import InProcessGrid, in_process_identity, parse_experiment, partition_nodes
from fedcrm.tasks import SimulatedFederation

TASK_IDS = ("churn", "recommendation")
"""The registered tasks, for ``pytest.mark.parametrize("task_name", TASK_IDS)``."""


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower stamps every message with the sender's identity, which its engines set."""
    with in_process_identity():
        yield


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread (as every simulated branch runs), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_experiment(task_name: str, **tables: Any) -> dict[str, Any]:
    """A small experiment TOML (as parsed) of ``task_name``: 3 synthetic branches, 2 rounds."""
    raw: dict[str, Any]
    if task_name == "churn":
        raw = {
            "name": "small-churn",
            "dataset": "synthetic:mlc",
            "rows": 600,
            "partition": {"kind": "iid", "num-branches": 3},
            "federation": {"num-rounds": 2, "lr": 0.05},
            "baselines": {"torch-epochs": 2},
        }
    else:
        raw = {
            "task": "recommendation",
            "name": "small-rec",
            "dataset": "synthetic",
            "federation": {"num-rounds": 2, "factors": 8, "batch-size": 256},
            "baselines": {"mf-epochs": 2},
        }
    for name, table in tables.items():
        key = name.replace("_", "-")
        raw[key] = {**raw.get(key, {}), **table} if isinstance(table, dict) else table
    return raw


@dataclass
class Federation:
    """Simulated branches on disk, the ClientApp over them and an in-process grid."""

    federation: FederationConfig
    settings: Any
    branches: Path
    simulated: SimulatedFederation
    app: ClientApp
    grid: InProcessGrid

    def subset(self, partition_ids: list[int]) -> InProcessGrid:
        """A grid over some of the branches (node ``p + 1`` serves partition ``p``)."""
        return InProcessGrid(self.app, {p + 1: {"partition-id": p} for p in partition_ids})


def build_federation(
    root: Path, raw: dict[str, Any], *, consent_db: str | None = None
) -> Federation:
    """Prepare the experiment's branches under ``root`` and a grid over all of them."""
    cfg = parse_experiment(raw)
    simulated = cfg.plugin.experiment.prepare(cfg.spec, cfg.settings, root, seed=cfg.seed)
    app = make_client_app(root / "branches", simulation=simulated.handle, consent_db=consent_db)
    grid = InProcessGrid(app, partition_nodes(len(simulated.branches)))
    return Federation(
        cfg.federation, simulated.settings or cfg.settings, root / "branches", simulated, app, grid
    )


@pytest.fixture
def task_name() -> str:
    """The task a test runs (override with ``pytest.mark.parametrize("task_name", TASK_IDS)``)."""
    return "churn"


@pytest.fixture
def federation(task_name: str, tmp_path: Path, task_identity: None, one_thread: None) -> Federation:
    """A small federation of ``task_name``: 3 synthetic branches on an in-process grid."""
    return build_federation(tmp_path, small_experiment(task_name))
