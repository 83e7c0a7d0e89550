"""Robust aggregation under poisoning: one of ten branches sends a scaled, sign-flipped update.

In-process on the strategies' ``aggregate_train`` with synthetic replies and a logistic
regression trained by NumPy gradient steps; no Ray.
"""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, MultiKrum
from sklearn.metrics import roc_auc_score

from fedcrm.exceptions import ConfigError
from fedcrm.simulation import in_process_identity
from fedcrm.strategies.guardrails import RobustAggregator
from fedcrm.strategies.robust import RobustConfig, robust_strategy

BRANCHES, FEATURES, ROUNDS = 10, 8, 8


pytestmark = pytest.mark.usefixtures("task_identity")


def _data(rng: np.random.Generator, rows: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(rows, FEATURES))
    y = (rng.random(rows) < 1 / (1 + np.exp(-(x @ w)))).astype(float)
    return x, y


def _local(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    for _ in range(5):
        p = 1 / (1 + np.exp(-(x @ w)))
        w = w - 0.5 * x.T @ (p - y) / len(y)
    return w


def _reply(w: np.ndarray, n: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(w.astype(np.float32))}),
            "metrics": MetricRecord({"num-examples": n}),
        }
    )
    return Message(content, dst_node_id=0, message_type="train")


def _train(strategy: FedAvg, attack: str | None) -> float:
    """Federated AUC on held-out rows after ROUNDS rounds; branch 0 attacks if asked."""
    rng = np.random.default_rng(7)
    truth = rng.normal(size=FEATURES)
    parts = [_data(rng, 200, truth) for _ in range(BRANCHES)]
    x_test, y_test = _data(rng, 2000, truth)
    w = np.zeros(FEATURES)
    for rnd in range(1, ROUNDS + 1):
        replies = []
        for b, (x, y) in enumerate(parts):
            local = _local(w, x, y)
            if b == 0 and attack == "sign-flip":
                local = w - 10.0 * (local - w)
            elif b == 0 and attack == "scale":
                local = w + 50.0 * rng.normal(size=FEATURES)
            replies.append(_reply(local, len(y)))
        arrays, _ = strategy.aggregate_train(rnd, replies)
        assert arrays is not None
        w = arrays["w"].numpy().astype(np.float64)
    return float(roc_auc_score(y_test, x_test @ w))


def _fedavg() -> FedAvg:
    return FedAvg(min_available_nodes=BRANCHES, min_train_nodes=BRANCHES)


ROBUST = {
    "krum": RobustConfig(RobustAggregator.KRUM, num_malicious=1),
    "multi-krum": RobustConfig(RobustAggregator.MULTI_KRUM, num_malicious=1, num_selected=5),
    "median": RobustConfig(RobustAggregator.MEDIAN),
    "trimmed-mean": RobustConfig(RobustAggregator.TRIMMED_MEAN, trim_beta=0.1),
}


@pytest.fixture(scope="module")
def clean_auc() -> float:
    with in_process_identity():  # module-scoped: set up before the per-test identity
        return _train(_fedavg(), None)


@pytest.mark.parametrize("attack", ["sign-flip", "scale"])
def test_fedavg_auc_drops_under_poisoning(clean_auc: float, attack: str) -> None:
    assert clean_auc > 0.8
    assert _train(_fedavg(), attack) < clean_auc - 0.15


@pytest.mark.parametrize("attack", ["sign-flip", "scale"])
@pytest.mark.parametrize("name", sorted(ROBUST), ids=sorted(ROBUST))
def test_robust_aggregator_keeps_its_auc(clean_auc: float, name: str, attack: str) -> None:
    strategy = robust_strategy(_fedavg(), ROBUST[name])
    assert _train(strategy, attack) > clean_auc - 0.02


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("krum", Krum),
        ("multi-krum", MultiKrum),
        ("median", FedMedian),
        ("trimmed-mean", FedTrimmedAvg),
    ],
)
def test_robust_strategy_copies_the_fedavg_settings(name: str, kind: type) -> None:
    like = FedAvg(fraction_train=0.5, min_available_nodes=7, weighted_by_key="rows")
    strategy = robust_strategy(like, ROBUST[name])
    assert type(strategy) is kind
    assert strategy.fraction_train == 0.5 and strategy.min_available_nodes == 7
    assert strategy.weighted_by_key == "rows"


def test_none_keeps_fedavg() -> None:
    like = _fedavg()
    assert robust_strategy(like, RobustConfig()) is like


def test_robust_refuses_to_replace_fedprox() -> None:
    with pytest.raises(ConfigError, match="replaces FedAvg"):
        robust_strategy(FedProx(), ROBUST["median"])


@pytest.mark.parametrize(
    "kwargs",
    [{"num_malicious": -1}, {"num_selected": 0}, {"trim_beta": 0.5}, {"trim_beta": -0.1}],
)
def test_invalid_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        RobustConfig(RobustAggregator.KRUM, **kwargs)  # type: ignore[arg-type]
