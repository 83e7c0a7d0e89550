"""The traffic meter counts train and evaluate messages both ways, per round."""

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fedcrm.server.traffic import MeteredGrid, TrafficMeter, wire_size


class _Echo:
    """Answers every message with its own content (duck-typed Grid)."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        out = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m-{msg.metadata.dst_node_id}"
            out.append(Message(msg.content, reply_to=msg))
        return out


def _msg(node: int, kind: str, values: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(values, np.float32))})})
    return Message(content, dst_node_id=node, message_type=kind)


def test_train_and_evaluate_count_query_does_not(task_identity: None) -> None:
    meter = TrafficMeter()
    grid = MeteredGrid(_Echo(), meter)  # type: ignore[arg-type]
    grid.send_and_receive([_msg(1, "query.moments", 1000)])
    assert meter.take().down == 0
    train = [_msg(n, "train", 100) for n in (1, 2)]
    size = wire_size(train[0].content)
    assert size > 400  # 100 float32 values and the record's framing
    grid.send_and_receive(train)
    grid.send_and_receive([_msg(1, "evaluate", 100)])
    got = meter.take()
    assert (got.down, got.up, got.branches) == (3 * size, 3 * size, 2)
    assert got.down_per_branch == 1.5 * size
    assert meter.take().down == 0  # take() starts the next round from zero
