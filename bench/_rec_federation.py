"""Shared by the in-process recommendation benches: the core's round loop and ClientApp, no Ray.

`run_in_process` prepares the experiment's branches with the recommendation task (as
``fedcrm simulate`` does), builds the real ClientApp over them and runs the ServerApp's round
loop (`fedcrm.server.run_federation`) through an in-process grid, one node per branch, branches
served one after another. `PayloadGrid` counts, per node and round, Flower's wire bytes of every
train and evaluate message and the item payload of the train messages (the item arrays, or the
CKKS ciphertext that replaces them under HE).
"""

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message, MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedcrm import wire as k
from fedcrm.client import make_client_app
from fedcrm.server import (
    FederationResult,
    RoundRecord,
    StrategyWrapper,
    run_federation,
    wire_size,
)
from fedcrm.simulation import ExperimentConfig, InProcessGrid, in_process_identity, partition_nodes
from fedcrm.tasks import SimulatedFederation


def _payload(msg: Message, *, reply: bool) -> int:
    """The bytes that carry the model: the item arrays, else the HE ciphertext."""
    content = msg.content
    if k.ARRAYS in content.array_records:
        return int(content.array_records[k.ARRAYS].count_bytes())
    fields = content.config_records.get(k.HE_RECORD)
    value = None if fields is None else fields.get(k.HE_UPDATE if reply else k.HE_AGGREGATE)
    return len(value) if isinstance(value, bytes) else 0


@dataclass
class Traffic:
    """Mean bytes per node over one round."""

    wire_down: float
    wire_up: float
    payload_down: float
    payload_up: float


class PayloadGrid(InProcessGrid):
    """`InProcessGrid` that adds up each round's bytes per node (down before delivery: a mod
    may replace a message's content in process)."""

    def __init__(self, client_app: ClientApp, node_configs: Any) -> None:
        super().__init__(client_app, node_configs)
        self.counts: dict[str, dict[int, int]] = {
            name: defaultdict(int)
            for name in ("wire_down", "wire_up", "payload_down", "payload_up")
        }

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        out = list(messages)
        counted = [m for m in out if m.metadata.message_type.split(".")[0] != MessageType.QUERY]
        for msg in counted:
            node = msg.metadata.dst_node_id
            self.counts["wire_down"][node] += wire_size(msg.content)
            if msg.metadata.message_type.split(".")[0] == MessageType.TRAIN:
                self.counts["payload_down"][node] += _payload(msg, reply=False)
        replies = list(super().send_and_receive(out, timeout=timeout))
        for reply in replies:
            kind = reply.metadata.message_type.split(".")[0]
            if kind == MessageType.QUERY or not reply.has_content():
                continue
            node = reply.metadata.src_node_id
            self.counts["wire_up"][node] += wire_size(reply.content)
            if kind == MessageType.TRAIN:
                self.counts["payload_up"][node] += _payload(reply, reply=True)
        return replies

    def take(self) -> Traffic:
        """Mean bytes per node since the last call."""
        means = {
            name: float(np.mean(list(values.values()))) if values else 0.0
            for name, values in self.counts.items()
        }
        for values in self.counts.values():
            values.clear()
        return Traffic(**means)


@dataclass
class InProcessRun:
    """A finished in-process federation."""

    result: FederationResult
    federation: SimulatedFederation
    settings: Any
    traffic: list[Traffic]


def run_in_process(
    cfg: ExperimentConfig,
    run_dir: Path,
    *,
    mods: Sequence[Mod] = (),
    wrap_strategy: StrategyWrapper | None = None,
    on_round: Callable[[RoundRecord, Traffic], None] | None = None,
) -> InProcessRun:
    """Prepare the branches under ``run_dir`` and run the federation of ``cfg`` in process."""
    task = cfg.plugin
    federation = task.experiment.prepare(cfg.spec, cfg.settings, run_dir, seed=cfg.seed)
    settings = federation.settings or cfg.settings
    app = make_client_app(run_dir / "branches", simulation=federation.handle, mods=mods)
    grid = PayloadGrid(app, partition_nodes(len(federation.branches)))
    traffic: list[Traffic] = []

    def record(r: RoundRecord) -> None:
        traffic.append(grid.take())
        if on_round is not None:
            on_round(r, traffic[-1])

    with in_process_identity():
        result = run_federation(
            grid,
            cfg.federation,
            settings,
            min_nodes=len(federation.branches),
            on_round=record,
            wrap_strategy=wrap_strategy,
        )
    return InProcessRun(result, federation, settings, traffic)
