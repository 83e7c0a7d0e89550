"""Shared helpers for strategy tests: reply messages and a grid of fixed node ids.

Flower's task identity is the root ``task_identity`` fixture (``tests/conftest.py``).
"""

import time
from collections.abc import Callable

import pytest
from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

ReplyFactory = Callable[[ArrayRecord, float, int], Message]


class FixedGrid:
    """The part of a Flower Grid that strategies' node sampling uses."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return self.node_ids


@pytest.fixture
def grid_of() -> Callable[[list[int]], FixedGrid]:
    """Build a grid with the given node ids."""
    return FixedGrid


@pytest.fixture
def make_reply() -> ReplyFactory:
    """A branch's train reply carrying ``arrays`` and ``num-examples = n`` from ``node``."""

    def build(arrays: ArrayRecord, n: float, node: int) -> Message:
        metadata = Metadata(
            run_id=1,
            message_id=f"m{node}",
            src_node_id=node,
            dst_node_id=0,
            reply_to_message_id="",
            group_id="1",
            created_at=time.time(),
            ttl=60.0,
            message_type="train",
        )
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})})
        return Message(metadata=metadata, content=content)  # type: ignore[call-overload]

    return build
