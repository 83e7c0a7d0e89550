import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from flwr.supercore.task_identity import TaskIdentity

from fedcrm.strategies.factory import StrategyName, build_strategy


class _Grid:
    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def _reply(value: float, n: int, node: int) -> Message:
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
    arrays = ArrayRecord({"w": Array(np.full((2, 2), value, dtype=np.float32))})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})})
    return Message(metadata=metadata, content=content)  # type: ignore[call-overload]


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        (StrategyName.FEDAVG, FedAvg),
        (StrategyName.FEDPROX, FedProx),
        (StrategyName.FEDADAM, FedAdam),
    ],
    ids=["fedavg", "fedprox", "fedadam"],
)
def test_each_strategy_configures_and_aggregates(name: StrategyName, cls: type) -> None:
    strategy = build_strategy(name, num_nodes=3, proximal_mu=0.5, server_lr=0.1)
    assert type(strategy) is cls  # unsubclassed: Flower's DP wrappers require plain FedAvg
    start = ArrayRecord({"w": Array(np.zeros((2, 2), dtype=np.float32))})
    messages = list(strategy.configure_train(1, start, ConfigRecord({"lr": 0.1}), _Grid()))  # type: ignore[arg-type]
    assert len(messages) == 3
    config = messages[0].content.config_records["config"]
    assert config["server-round"] == 1
    if name is StrategyName.FEDPROX:
        assert config["proximal-mu"] == 0.5
    arrays, _ = strategy.aggregate_train(1, [_reply(1.0, 10, 1), _reply(3.0, 30, 2)])
    assert arrays is not None
    w = arrays["w"].numpy()
    assert np.all(np.isfinite(w))
    if name is StrategyName.FEDADAM:
        # Server-side Adam moves from the start point towards the mean update, by about eta.
        assert np.all((w > 0) & (w < 2.5))
    else:
        np.testing.assert_allclose(w, np.full((2, 2), 2.5))
