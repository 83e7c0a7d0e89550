from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedcrm.strategies.factory import StrategyName, build_strategy
from fedcrm.tasks.churn.metrics import aggregate_churn_evaluation


def _reply(
    make_reply: Callable[[ArrayRecord, float, int], Message], value: float, n: int, node: int
) -> Message:
    return make_reply(ArrayRecord({"w": Array(np.full((2, 2), value, dtype=np.float32))}), n, node)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        (StrategyName.FEDAVG, FedAvg),
        (StrategyName.FEDPROX, FedProx),
        (StrategyName.FEDADAM, FedAdam),
    ],
    ids=["fedavg", "fedprox", "fedadam"],
)
def test_each_strategy_configures_and_aggregates(
    name: StrategyName,
    cls: type,
    task_identity: None,
    make_reply: Callable[[ArrayRecord, float, int], Message],
    grid_of: Callable[[list[int]], Any],
) -> None:
    strategy = build_strategy(
        name,
        num_nodes=3,
        evaluate_metrics=aggregate_churn_evaluation,
        proximal_mu=0.5,
        server_lr=0.1,
    )
    assert type(strategy) is cls  # unsubclassed: Flower's DP wrappers require plain FedAvg
    assert strategy.evaluate_metrics_aggr_fn is aggregate_churn_evaluation  # the task's pooling
    start = ArrayRecord({"w": Array(np.zeros((2, 2), dtype=np.float32))})
    messages = list(
        strategy.configure_train(1, start, ConfigRecord({"lr": 0.1}), grid_of([1, 2, 3]))
    )  # type: ignore[arg-type]
    assert len(messages) == 3
    config = messages[0].content.config_records["config"]
    assert config["server-round"] == 1
    if name is StrategyName.FEDPROX:
        assert config["proximal-mu"] == 0.5
    arrays, _ = strategy.aggregate_train(
        1, [_reply(make_reply, 1.0, 10, 1), _reply(make_reply, 3.0, 30, 2)]
    )
    assert arrays is not None
    w = arrays["w"].numpy()
    assert np.all(np.isfinite(w))
    if name is StrategyName.FEDADAM:
        # Server-side Adam moves from the start point towards the mean update, by about eta.
        assert np.all((w > 0) & (w < 2.5))
    else:
        np.testing.assert_allclose(w, np.full((2, 2), 2.5))
