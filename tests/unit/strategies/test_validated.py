from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import FedAvg

from fedcrm.strategies.validated import ValidatedStrategy, check_update

SHAPES = {"w": (3, 2), "b": (3,)}


def _arrays(value: float, shapes: dict[str, tuple[int, ...]] = SHAPES) -> ArrayRecord:
    return ArrayRecord({k: Array(np.full(s, value, dtype=np.float32)) for k, s in shapes.items()})


@pytest.fixture
def strategy(task_identity: None, grid_of: Callable[[list[int]], Any]) -> ValidatedStrategy:
    s = ValidatedStrategy(FedAvg(min_available_nodes=1, min_train_nodes=1))
    list(s.configure_train(1, _arrays(0.0), ConfigRecord(), grid_of([1, 2, 3, 4])))  # type: ignore[arg-type]
    return s


def test_good_updates_average_like_numpy(
    strategy: ValidatedStrategy, make_reply: Callable[[ArrayRecord, float, int], Message]
) -> None:
    replies = [make_reply(_arrays(1.0), 10, 1), make_reply(_arrays(4.0), 30, 2)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    expected = (1.0 * 10 + 4.0 * 30) / 40
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((3, 2), expected))
    assert strategy.rejections == []


@pytest.mark.parametrize(
    ("arrays", "n", "reason"),
    [
        (_arrays(float("nan")), 10, "NaN"),
        (_arrays(1.0, {"w": (2, 3), "b": (3,)}), 10, "shape (2, 3), expected (3, 2)"),
        (_arrays(1.0, {"w": (3, 2)}), 10, "parameter names differ"),
        (_arrays(1.0), 0, "num-examples must be a positive number"),
        (_arrays(1.0), -5, "num-examples must be a positive number"),
    ],
    ids=["nan", "shape", "names", "zero-count", "negative-count"],
)
def test_bad_update_is_left_out(
    strategy: ValidatedStrategy,
    make_reply: Callable[[ArrayRecord, float, int], Message],
    arrays: ArrayRecord,
    n: float,
    reason: str,
) -> None:
    replies = [make_reply(_arrays(2.0), 10, 1), make_reply(arrays, n, 2)]
    out, _ = strategy.aggregate_train(1, replies)
    assert out is not None
    np.testing.assert_allclose(out["w"].numpy(), np.full((3, 2), 2.0))
    assert len(strategy.rejections) == 1
    assert strategy.rejections[0].node_id == 2
    assert reason in strategy.rejections[0].reason


def test_check_update_accepts_good(
    make_reply: Callable[[ArrayRecord, float, int], Message],
) -> None:
    assert check_update(_arrays(0.0), make_reply(_arrays(1.0), 3, 1), "num-examples") is None


def test_all_bad_gives_no_model(
    strategy: ValidatedStrategy, make_reply: Callable[[ArrayRecord, float, int], Message]
) -> None:
    out, _ = strategy.aggregate_train(1, [make_reply(_arrays(float("inf")), 10, 1)])
    assert out is None
