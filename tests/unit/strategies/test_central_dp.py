"""Central DP through Flower's wrappers, in process: clipping, equal weights, ledger, budget."""

import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcrm.compliance import (
    Decision,
    Mechanism,
    PrivacyLedger,
    PrivacyUnit,
    SamplingMethod,
    open_store,
    sqlite_url,
)
from fedcrm.exceptions import ConfigError
from fedcrm.privacy import CentralDPConfig, CentralDPMode
from fedcrm.simulation.config import parse_experiment
from fedcrm.strategies.central_dp import CentralBudgetExhausted, CentralDPStrategy
from fedcrm.strategies.validated import ValidatedStrategy

SHAPES = {"w": (4, 3), "b": (3,)}


pytestmark = pytest.mark.usefixtures("task_identity")


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _fedavg(n: int) -> FedAvg:
    return FedAvg(min_available_nodes=n, min_train_nodes=n, min_evaluate_nodes=n)


def _arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.astype(np.float32)) for k, v in values.items()})


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _reply(arrays: ArrayRecord, n: float, node: int, **metrics: float) -> Message:
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
    content = RecordDict(
        {"arrays": arrays, "metrics": MetricRecord({"num-examples": n, **metrics})}
    )
    reply: Message = Message(metadata=metadata, content=content)  # type: ignore[call-overload]
    return reply


def _update(base: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> ArrayRecord:
    return _arrays({k: base[k] + delta[k] for k in base})


def _norm(delta: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in delta.values())))


def _ledger(tmp_path: Path) -> PrivacyLedger:
    return PrivacyLedger(open_store(sqlite_url(tmp_path / "ledger.db")))


def _strategy(cfg: CentralDPConfig, nodes: int, **kwargs: object) -> CentralDPStrategy:
    return CentralDPStrategy(_fedavg(nodes), cfg, rounds=3, **kwargs)  # type: ignore[arg-type]


deltas = st.lists(
    st.floats(min_value=-50, max_value=50, allow_nan=False, width=32), min_size=15, max_size=15
).filter(lambda xs: any(abs(x) > 1e-3 for x in xs))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(deltas, min_size=2, max_size=4), st.floats(min_value=0.05, max_value=10))
def test_server_clipped_update_norm_is_at_most_c(flat: list[list[float]], c: float) -> None:
    base = _global()
    cfg = CentralDPConfig(noise_multiplier=0.5, clipping_norm=c)
    strategy = _strategy(cfg, len(flat))
    grid = _Grid(list(range(1, len(flat) + 1)))
    list(strategy.configure_train(1, _arrays(base), ConfigRecord(), grid))  # type: ignore[arg-type]
    replies = []
    for node, values in enumerate(flat, start=1):
        delta = {"w": np.array(values[:12]).reshape(4, 3), "b": np.array(values[12:])}
        replies.append(_reply(_update(base, delta), 10.0 * node, node))
    strategy.aggregate_train(1, replies)
    for reply in replies:  # Flower's wrapper replaced each reply's arrays by the clipped ones
        got = reply.content.array_records["arrays"].to_numpy_ndarrays()
        clipped = {k: g.astype(np.float64) - base[k] for k, g in zip(SHAPES, got, strict=True)}
        assert _norm(clipped) <= c * (1 + 1e-5) + 1e-5


def test_equal_weights_and_noise_scaled_to_replies(tmp_path: Path) -> None:
    base = _global()
    cfg = CentralDPConfig(noise_multiplier=1e-6, clipping_norm=100.0)  # no clipping, no noise
    ledger = _ledger(tmp_path)
    strategy = ValidatedStrategy(_strategy(cfg, 3, ledger=ledger, run_id="r"))
    grid = _Grid([1, 2, 3])
    list(strategy.configure_train(1, _arrays(base), ConfigRecord(), grid))  # type: ignore[arg-type]
    ups = [{k: np.full(s, float(i), dtype=np.float32) for k, s in SHAPES.items()} for i in (1, 2)]
    replies = [
        _reply(_update(base, u), n, node) for u, n, node in zip(ups, (1, 99), (1, 2), strict=True)
    ]
    bad = {k: np.full(s, np.nan, dtype=np.float32) for k, s in SHAPES.items()}
    replies.append(_reply(_arrays(bad), 5, 3))  # dropped by validation: m = 2
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    got = arrays.to_numpy_ndarrays()
    for name, g in zip(SHAPES, got, strict=True):
        np.testing.assert_allclose(g, base[name] + 1.5, atol=1e-3)  # mean of 1 and 2, unweighted
    assert metrics["central-dp-branches"] == 2
    assert "central-dp-weight" not in metrics
    [entry] = ledger.entries(run_id="r")
    assert entry.privacy_unit is PrivacyUnit.BRANCH
    assert entry.mechanism is Mechanism.GAUSSIAN
    assert entry.sampling_method is SamplingMethod.NONE and entry.sampling_rate == 1.0
    assert entry.branch == "federation" and entry.steps == 1
    assert entry.cumulative_epsilon == pytest.approx(metrics["central-dp-epsilon"])
    assert len(strategy.rejections) == 1


def test_adaptive_clipping_norm_moves_towards_the_quantile() -> None:
    base = _global()
    cfg = CentralDPConfig(
        mode=CentralDPMode.SERVER_ADAPTIVE,
        noise_multiplier=1e-3,
        clipped_count_stddev=1e-2,
        clipping_norm=0.1,
        clip_norm_lr=0.5,
    )
    strategy = _strategy(cfg, 4)
    grid = _Grid([1, 2, 3, 4])
    norms = []
    for rnd in range(1, 4):
        norms.append(strategy.clipping_norm)
        list(strategy.configure_train(rnd, _arrays(base), ConfigRecord(), grid))  # type: ignore[arg-type]
        delta = {k: np.full(s, 1.0 / np.sqrt(15), dtype=np.float32) for k, s in SHAPES.items()}
        strategy.aggregate_train(rnd, [_reply(_update(base, delta), 5, n) for n in (1, 2, 3, 4)])
    # Every update (norm 1) is clipped at C = 0.1, so C must grow (Andrew et al.'s rule);
    # Flower's own rule, on the clipped fraction, would shrink it.
    assert norms[0] < norms[1] < norms[2] < 1.0
    assert [r.clipping_norm for r in strategy.summary_data.rounds] == pytest.approx(norms)


def test_client_side_update_above_c_is_rejected() -> None:
    base = _global()
    cfg = CentralDPConfig(mode=CentralDPMode.CLIENT_FIXED, noise_multiplier=1.0, clipping_norm=1.0)
    strategy = ValidatedStrategy(_strategy(cfg, 2))
    messages = list(
        strategy.configure_train(1, _arrays(base), ConfigRecord(), _Grid([1, 2]))  # type: ignore[arg-type]
    )
    assert all(m.content.config_records["config"]["clipping_norm"] == 1.0 for m in messages)
    small = {k: np.full(s, 0.1, dtype=np.float32) for k, s in SHAPES.items()}
    large = {k: np.full(s, 1.0, dtype=np.float32) for k, s in SHAPES.items()}
    replies = [_reply(_update(base, small), 5, 1), _reply(_update(base, large), 5, 2)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert [r.node_id for r in strategy.rejections] == [2]
    assert "exceeds the clipping norm" in strategy.rejections[0].reason


def test_budget_refuses_the_round_and_records_it(tmp_path: Path) -> None:
    base = _global()
    ledger = _ledger(tmp_path)
    cfg = CentralDPConfig(noise_multiplier=2.0, max_epsilon=2.5, delta=1e-5)
    strategy = _strategy(cfg, 2, ledger=ledger, run_id="r")
    grid = _Grid([1, 2])
    delta = {k: np.full(s, 0.1, dtype=np.float32) for k, s in SHAPES.items()}
    list(strategy.configure_train(1, _arrays(base), ConfigRecord(), grid))  # type: ignore[arg-type]
    strategy.aggregate_train(1, [_reply(_update(base, delta), 5, n) for n in (1, 2)])
    with pytest.raises(CentralBudgetExhausted, match=r"budget 2\.5"):
        strategy.configure_train(2, _arrays(base), ConfigRecord(), grid)  # type: ignore[arg-type]
    first, refused = ledger.entries(run_id="r")
    assert first.decision is Decision.ADMITTED and refused.decision is Decision.REFUSED
    assert refused.cumulative_epsilon == first.cumulative_epsilon
    # A new run on the same ledger continues from its history (and is refused at once).
    again = _strategy(cfg, 2, ledger=ledger, run_id="r2")
    assert again.accountant.epsilon() == pytest.approx(first.cumulative_epsilon)


def test_inner_strategy_must_be_fedavg_mean() -> None:
    with pytest.raises(ConfigError, match="FedAvg's mean"):
        CentralDPStrategy(FedAdam(), CentralDPConfig(noise_multiplier=1.0), rounds=2)


def _raw(central: dict[str, object], **top: object) -> dict[str, object]:
    return {"name": "c", "dataset": "synthetic:mlc", "central-dp": central, **top}


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"aggregation": {"mode": "he"}}, "server-side fixed clipping on HE"),
        ({"federation": {"strategy": "fedadam"}}, "central DP with fedadam"),
        ({"aggregation": {"robust": "krum"}}, "central DP with krum"),
    ],
    ids=["he", "fedadam", "krum"],
)
def test_guardrails_refuse_central_dp_combinations(extra: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_experiment(_raw({"mode": "server-fixed", "target-epsilon": 8.0}, **extra))
    if "aggregation" in extra and extra["aggregation"] == {"mode": "he"}:
        with pytest.raises(ConfigError, match="central DP on HE ciphertexts"):
            parse_experiment(_raw({"mode": "client-fixed", "target-epsilon": 8.0}, **extra))


def test_central_dp_table_is_parsed_and_round_trips() -> None:
    cfg = parse_experiment(_raw({"mode": "client-adaptive", "noise-multiplier": 1.2}))
    assert cfg.central_dp is not None and cfg.central_dp.mode is CentralDPMode.CLIENT_ADAPTIVE
    with pytest.raises(ConfigError, match=r"\[central-dp\] has unknown key"):
        parse_experiment(_raw({"mode": "client-fixed", "noise-multiplier": 1.2, "sigma": 1}))


@pytest.mark.parametrize("mode", [CentralDPMode.SERVER_FIXED, CentralDPMode.SERVER_ADAPTIVE])
def test_zero_update_counts_in_the_mean(mode: CentralDPMode) -> None:
    base = _global()
    cfg = CentralDPConfig(
        mode=mode, noise_multiplier=1e-6, clipped_count_stddev=1e-5, clipping_norm=100.0
    )
    strategy = _strategy(cfg, 2)
    list(strategy.configure_train(1, _arrays(base), ConfigRecord(), _Grid([1, 2])))  # type: ignore[arg-type]
    up = {k: np.full(s, 2.0, dtype=np.float32) for k, s in SHAPES.items()}
    zero = {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}
    replies = [_reply(_update(base, up), 5, 1), _reply(_update(base, zero), 5, 2)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    for name, got in zip(SHAPES, arrays.to_numpy_ndarrays(), strict=True):
        np.testing.assert_allclose(got, base[name] + 1.0, atol=1e-3)  # (2 + 0) / 2
    # Both replies zero: still one noisy release, accounted.
    list(strategy.configure_train(2, arrays, ConfigRecord(), _Grid([1, 2])))  # type: ignore[arg-type]
    now = {k: v.copy() for k, v in zip(SHAPES, arrays.to_numpy_ndarrays(), strict=True)}
    again, _ = strategy.aggregate_train(2, [_reply(_arrays(now), 5, n) for n in (1, 2)])
    assert again is not None
    assert len(strategy.summary_data.rounds) == 2
