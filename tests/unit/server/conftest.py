"""An in-process federation: the real ClientApp behind a Grid that calls it directly.

No Ray, no network: `InProcessGrid.send_and_receive` hands each message to the ClientApp with
the destination node's own `Context` (whose ``state`` lasts across rounds, as on a SuperNode).
"""

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from fedcrm import constants as k
from fedcrm.client.app import branch_dir, make_client_app
from fedcrm.client.branch import write_export
from fedcrm.data.check import coerce_frame
from fedcrm.data.schema import MLC
from fedcrm.data.synthetic import synthetic_export


class InProcessGrid:
    """Duck-typed `flwr.serverapp.Grid` that runs every message on an in-process ClientApp."""

    def __init__(self, app: ClientApp, node_configs: dict[int, dict[str, int | str]]) -> None:
        self.app = app
        self.contexts = {
            node: Context(
                run_id=1, node_id=node, node_config=dict(cfg), state=RecordDict(), run_config={}
            )
            for node, cfg in node_configs.items()
        }
        self._ids = itertools.count(1)
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"msg-{next(self._ids)}"  # as a SuperLink does
            self.sent.append(msg)
            replies.append(self.app(msg, self.contexts[msg.metadata.dst_node_id]))
        self.replies.extend(replies)
        return replies


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower reads the sender's identity from `TaskIdentity` when a message is built."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def write_synthetic_branches(root: Path, sizes: list[int], *, seed: int = 0) -> Path:
    """Write one pseudonymised-looking MLC export per branch under ``root/branches``."""
    branches = root / "branches"
    for pid, rows in enumerate(sizes):
        frame = coerce_frame(synthetic_export(MLC, rows, seed=seed + pid), MLC)
        frame[MLC.id_column] = [f"p_{pid}_{i}" for i in range(len(frame))]
        write_export(frame, MLC, branch_dir(branches, pid) / "export.parquet")
    return branches


@dataclass
class Federation:
    """Branch folders on disk and a grid over any subset of them (same ClientApp)."""

    branches: Path
    app: ClientApp
    grid: InProcessGrid

    def subset(self, partition_ids: list[int]) -> InProcessGrid:
        """A grid over some of the branches (e.g. one branch that ran alone earlier)."""
        return InProcessGrid(self.app, {101 + p: {k.NODE_PARTITION_ID: p} for p in partition_ids})


@pytest.fixture
def federation(tmp_path: Path, task_identity: None) -> Federation:
    """Three synthetic MLC branches (300, 240, 200 customers) on an in-process grid."""
    branches = write_synthetic_branches(tmp_path, [300, 240, 200])
    app = make_client_app(branches)
    grid = InProcessGrid(app, {101 + pid: {k.NODE_PARTITION_ID: pid} for pid in range(3)})
    return Federation(branches, app, grid)
