"""Bytes on the wire per round: a Grid wrapper that measures every train and evaluate message.

Sizes are Flower's wire sizes: the protobuf encoding of each message's ``RecordDict``
(``flwr.common.serde.recorddict_to_proto``), server to branch ("down") and branch to server
("up"). Train and evaluate messages count, whatever protocol they carry (plaintext arrays, CKKS
ciphertexts, or the four SecAgg+ stages, which are all train messages); the federated-statistics
query before round 1 does not. The round loop's callback reads and resets the meter
(:meth:`TrafficMeter.take`) once per round.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message, MessageType, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

from fedcrm.strategies._grid import DelegatingGrid

__all__ = ["MeteredGrid", "RoundTraffic", "TrafficMeter"]

_COUNTED = (MessageType.TRAIN, MessageType.EVALUATE)


def wire_size(content: RecordDict) -> int:
    """Protobuf bytes of a message's content, as Flower sends it."""
    return int(recorddict_to_proto(content).ByteSize())


@dataclass(frozen=True)
class RoundTraffic:
    """One round's traffic (train and evaluate messages)."""

    down: int
    """Bytes the server sent, all branches together."""
    up: int
    """Bytes the branches sent back."""
    branches: int
    """Branches that received at least one message."""

    @property
    def down_per_branch(self) -> float:
        """Server-to-branch bytes per branch."""
        return self.down / self.branches if self.branches else 0.0

    @property
    def up_per_branch(self) -> float:
        """Branch-to-server bytes per branch."""
        return self.up / self.branches if self.branches else 0.0

    def as_dict(self) -> dict[str, float]:
        """Plain figures for ``metrics.jsonl``."""
        return {
            "bytes_down": self.down,
            "bytes_up": self.up,
            "branches": self.branches,
            "bytes_down_per_branch": self.down_per_branch,
            "bytes_up_per_branch": self.up_per_branch,
        }


@dataclass
class TrafficMeter:
    """Running byte counts since the last :meth:`take`."""

    down: int = 0
    up: int = 0
    nodes: set[int] = field(default_factory=set)

    def take(self) -> RoundTraffic:
        """The counts so far; the meter starts again from zero."""
        out = RoundTraffic(self.down, self.up, len(self.nodes))
        self.down, self.up, self.nodes = 0, 0, set()
        return out


def _counted(msg: Message) -> bool:
    return msg.metadata.message_type.split(".")[0] in _COUNTED


class MeteredGrid(DelegatingGrid):
    """Delegate to ``grid``; add the size of every train / evaluate message to ``meter``."""

    def __init__(self, grid: Grid, meter: TrafficMeter) -> None:
        super().__init__(grid)
        self.meter = meter

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Count, then delegate."""
        out = list(messages)
        self._count_down(out)
        return self.grid.push_messages(out)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegate, then count."""
        replies = list(self.grid.pull_messages(message_ids))
        self._count_up(replies)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Count both directions of one exchange."""
        out = list(messages)
        self._count_down(out)
        replies = list(self.grid.send_and_receive(out, timeout=timeout))
        self._count_up(replies)
        return replies

    def _count_down(self, messages: list[Message]) -> None:
        for msg in messages:
            if _counted(msg):
                self.meter.down += wire_size(msg.content)
                self.meter.nodes.add(msg.metadata.dst_node_id)

    def _count_up(self, replies: list[Message]) -> None:
        for reply in replies:
            if _counted(reply) and reply.has_content():
                self.meter.up += wire_size(reply.content)
