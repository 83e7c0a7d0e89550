"""A strategy wrapper that rejects malformed branch updates before the inner strategy sees them."""

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rejection:
    """A branch update left out of aggregation, and why."""

    server_round: int
    node_id: int
    reason: str


def check_update(expected: ArrayRecord, reply: Message, weight_key: str) -> str | None:
    """Return why ``reply`` cannot be aggregated against ``expected``, or ``None`` if it can."""
    if reply.has_error():
        return f"branch reported an error: {reply.error.reason}"
    content = reply.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return "expected exactly one ArrayRecord and one MetricRecord"
    arrays = next(iter(content.array_records.values()))
    if set(arrays.keys()) != set(expected.keys()):
        return f"parameter names differ from the global model's: {sorted(arrays.keys())}"
    for name, ref in expected.items():
        got = arrays[name]
        if tuple(got.shape) != tuple(ref.shape):
            return f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if not np.all(np.isfinite(got.numpy())):
            return f"{name}: contains NaN or infinite values"
    metrics = next(iter(content.metric_records.values()))
    count = metrics.get(weight_key)
    if not isinstance(count, int | float) or not np.isfinite(count) or count <= 0:
        return f"{weight_key} must be a positive number, got {count!r}"
    return None


@runtime_checkable
class ReplyChecker(Protocol):
    """An inner strategy whose replies are not plaintext arrays (HE ciphertexts) checks them."""

    def check_reply(self, server_round: int, reply: Message) -> str | None:
        """Why ``reply`` cannot be aggregated, or ``None`` if it can."""


@runtime_checkable
class RejectionSource(Protocol):
    """An inner strategy that leaves updates out itself (SecAgg+ dropouts) reports them."""

    def take_rejections(self) -> list[Rejection]:
        """The updates left out since the last call, with reasons."""


class ValidatedStrategy(Strategy):
    """Wrap a strategy; drop updates with wrong names, shapes, NaN values or bad counts.

    Flower's own checks only compare record keys across replies. A single NaN or mis-shaped
    update would otherwise poison the global model for every branch. Rejected updates are
    logged with the round and node and kept in `rejections`; the inner strategy aggregates
    the rest. The inner strategy's ``aggregate_train`` is called unchanged, so Flower's DP
    wrappers and their accountant still see a plain FedAvg. An inner strategy implementing
    `ReplyChecker` (the HE wrapper, whose replies are ciphertexts) checks its replies itself.
    """

    def __init__(self, inner: Strategy, *, weight_key: str = "num-examples") -> None:
        self.inner = inner
        self.weight_key = weight_key
        self.rejections: list[Rejection] = []
        self._sent: ArrayRecord | None = None

    def summary(self) -> None:
        """Log the inner strategy's summary."""
        logger.info("ValidatedStrategy wrapping %s", type(self.inner).__name__)
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global arrays the branches start from, then delegate."""
        self._sent = arrays
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate only the well-formed updates."""
        if self._sent is None:
            raise RuntimeError("aggregate_train called before configure_train")
        good: list[Message] = []
        own = self.inner if isinstance(self.inner, ReplyChecker) else None
        for reply in replies:
            if own is not None:
                reason = own.check_reply(server_round, reply)
            else:
                reason = check_update(self._sent, reply, self.weight_key)
            if reason is None:
                good.append(reply)
                continue
            node = reply.metadata.src_node_id
            logger.warning("round %d: update of node %d rejected: %s", server_round, node, reason)
            self.rejections.append(Rejection(server_round, node, reason))
        result = self.inner.aggregate_train(server_round, good)
        if isinstance(self.inner, RejectionSource):
            self.rejections.extend(self.inner.take_rejections())
        return result

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate (errors are dropped by the inner strategy)."""
        return self.inner.aggregate_evaluate(server_round, replies)
