"""An in-process Grid: the real ServerApp loop and ClientApp in one process, without Ray.

For benchmarks and tests: the round loop and the ClientApp are the ones a simulation runs;
only the transport differs. Messages are handed over as objects, each node has its own
`Context` whose ``state`` lasts across rounds (as on a SuperNode), and every message gets a
message id as a SuperLink gives it. Use it inside `in_process_identity`.
"""

import itertools
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedcrm import wire as k


@contextmanager
def in_process_identity() -> Iterator[None]:
    """Set Flower's task identity (run 1, node 0) while an `InProcessGrid` run builds messages.

    Flower stamps every new `Message` with the sender's identity, which its engines set; in
    process nobody does. The previous identity is restored on exit.
    """
    names = ("_task_id", "_run_id", "_node_id")
    saved = {name: getattr(TaskIdentity, name) for name in names}
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = 1, 1, 0
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)


def partition_nodes(num_nodes: int) -> dict[int, dict[str, int | str]]:
    """Node configs of ``num_nodes`` simulated branches: node ``i + 1`` serves partition ``i``."""
    return {
        node: {k.NODE_PARTITION_ID: node - 1, "num-partitions": num_nodes}
        for node in range(1, num_nodes + 1)
    }


class InProcessGrid(Grid):
    """A Grid that runs a ClientApp in this process, one `Context` per node (no Ray).

    Args:
        client_app: The ClientApp every node runs.
        node_configs: Node id -> its node config (`partition_nodes` for simulated branches).
    """

    def __init__(
        self, client_app: ClientApp, node_configs: Mapping[int, Mapping[str, int | str]]
    ) -> None:
        self.client_app = client_app
        self.contexts = {
            node: Context(
                run_id=1, node_id=node, node_config=dict(cfg), state=RecordDict(), run_config={}
            )
            for node, cfg in node_configs.items()
        }
        self._ids = itertools.count(1)
        self.sent: list[Message] = []
        """Every message sent, in order (tests read them)."""
        self.replies: list[Message] = []
        """Every reply received, in order."""

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        """Not used in process."""

    @property
    def run(self) -> Any:
        """Not used in process."""
        raise NotImplementedError

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Build a message to a node."""
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        """The simulated nodes."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Not used in process."""
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[str]:  # type: ignore[override]
        """Not used in process."""
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver each message to its node's ClientApp and collect the replies."""
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"msg-{next(self._ids)}"  # as a SuperLink does
            self.sent.append(msg)
            replies.append(self.client_app(msg, self.contexts[msg.metadata.dst_node_id]))
        self.replies.extend(replies)
        return replies
