"""Distributed branch-level DP under HE: branch clipping and noise, K_min, ledger, guardrails."""

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedcrm import wire
from fedcrm.client.he_mod import HEMod
from fedcrm.compliance import Decision, PrivacyLedger, PrivacyUnit, open_store, sqlite_url
from fedcrm.exceptions import ConfigError
from fedcrm.privacy import CentralDPConfig, CentralDPMode, DistributedNoise, he, keys
from fedcrm.privacy.dp import clip_to_norm
from fedcrm.simulation import parse_experiment, run_experiment
from fedcrm.strategies import he as hs
from fedcrm.strategies.distributed_dp import DistributedDPStrategy
from fedcrm.strategies.guardrails import AggregationMode, CombinationRefused, check_combination
from fedcrm.strategies.validated import ValidatedStrategy

SHAPES = {"w": (3, 4), "b": (4,)}


pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys") / "he"
    keys.init_keys(folder)
    return folder


@pytest.fixture(scope="module")
def public(key_dir: Path) -> he.HEContext:
    return keys.load_public_context(keys.current_generation(key_dir).public_path)


@pytest.fixture(scope="module")
def secret(key_dir: Path) -> he.HEContext:
    return keys.load_secret_context(keys.current_generation(key_dir).secret_path)


# ------------------------------------------------------------------------------ the branch math


@settings(max_examples=200, deadline=None)
@given(
    delta=hnp.arrays(
        np.float64,
        st.integers(1, 64),
        elements=st.floats(-1e150, 1e150, allow_nan=False, allow_infinity=False),
    ),
    clipping_norm=st.floats(1e-6, 1e6),
)
def test_every_clipped_update_has_norm_at_most_c(delta: np.ndarray, clipping_norm: float) -> None:
    clipped = clip_to_norm(delta, clipping_norm)
    assert float(np.linalg.norm(clipped)) <= clipping_norm
    if float(np.linalg.norm(delta)) <= clipping_norm:
        np.testing.assert_array_equal(clipped, delta)


@pytest.mark.parametrize(("branches", "min_honest"), [(5, 5), (6, 3)])
def test_decrypted_sum_carries_noise_std_z_c(
    public: he.HEContext, secret: he.HEContext, branches: int, min_honest: int
) -> None:
    """K branches clip, noise and encrypt; the decrypted sum's noise has std z C sqrt(K/K_min)."""
    z, c, dim = 1.3, 0.5, 4096
    noise = DistributedNoise(z, c, min_honest)
    data = np.random.default_rng(99)
    deltas = [data.normal(0.0, 1.0, dim) for _ in range(branches)]  # norms ~64 >> C: all clipped
    sent = [
        he.encrypt_update(
            secret,
            wire.pre_weight(noise.privatize(d, rng=np.random.default_rng(1000 + i)), 1),
            key_id=secret.key_id,
        )
        for i, d in enumerate(deltas)
    ]
    total = he.decrypt(secret, he.sum_encrypted(public, sent)) * wire.WEIGHT_UNIT
    residual = total - sum(clip_to_norm(d, c) for d in deltas)
    expected = z * c * np.sqrt(branches / min_honest)
    assert abs(float(np.mean(residual))) < 4 * expected / np.sqrt(dim)
    assert float(np.std(residual)) == pytest.approx(expected, rel=0.05)


def test_noise_settings_travel_and_are_validated() -> None:
    noise = DistributedNoise(1.0, 2.0, 4)
    assert DistributedNoise.from_fields(noise.to_fields()) == noise
    assert DistributedNoise.from_fields({}) is None
    with pytest.raises(ConfigError, match="all of"):
        DistributedNoise.from_fields({"ddp-noise-multiplier": 1.0})
    with pytest.raises(ConfigError, match="min_honest"):
        DistributedNoise(1.0, 2.0, 0)


# ------------------------------------------------------------------------------ the round


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _initial() -> ArrayRecord:
    return ArrayRecord({k: Array(np.zeros(s, dtype=np.float32)) for k, s in SHAPES.items()})


class _Branch:
    def __init__(self, node_id: int, mod: HEMod, step: float, count: float) -> None:
        self.node_id, self.mod, self.step, self.count = node_id, mod, step, count
        self.context = Context(1, node_id, {}, RecordDict(), {})
        self.seen: dict[str, np.ndarray] = {}

    def _handler(self, msg: Message, _ctxt: Context) -> Message:
        record = msg.content.array_records["arrays"]
        self.seen = {k: record[k].numpy().copy() for k in record}
        if msg.metadata.message_type == "train":
            local = {k: (v + self.step).astype(np.float32) for k, v in self.seen.items()}
            arrays = ArrayRecord({k: Array(v) for k, v in local.items()})
            content = RecordDict(
                {"arrays": arrays, "metrics": MetricRecord({"num-examples": self.count})}
            )
        else:
            content = RecordDict({"metrics": MetricRecord({"num-examples": 5, "loss": 0.5})})
        return Message(content, reply_to=msg)

    def handle(self, msg: Message) -> Message:
        return self.mod(msg, self.context, self._handler)


def _setup(
    key_dir: Path, public: he.HEContext, tmp_path: Path, *, min_honest: int
) -> tuple[ValidatedStrategy, DistributedDPStrategy, dict[int, _Branch], PrivacyLedger]:
    mod = HEMod(key_dir)
    mod._rng_factory = lambda: np.random.default_rng(7)  # test seam: fixed noise
    steps = {10: 0.1, 11: -0.2, 12: 0.3}
    branches = {
        n: _Branch(n, mod, s, count=100.0 * (i + 1)) for i, (n, s) in enumerate(steps.items())
    }
    inner = FedAvg(min_available_nodes=3, min_train_nodes=3, min_evaluate_nodes=3)
    aggregation = hs.HEAggregation(inner, public_context=public)
    config = CentralDPConfig(
        mode=CentralDPMode.DISTRIBUTED, noise_multiplier=0.8, clipping_norm=0.5
    )
    ledger = PrivacyLedger(open_store(sqlite_url(tmp_path / "ledger.db")))
    ddp = DistributedDPStrategy(
        aggregation, config, rounds=2, min_honest=min_honest, ledger=ledger, run_id="r"
    )
    return ValidatedStrategy(ddp), ddp, branches, ledger


def test_rounds_are_equal_weighted_noised_and_one_ledger_row_each(
    key_dir: Path, public: he.HEContext, tmp_path: Path
) -> None:
    strategy, ddp, branches, ledger = _setup(key_dir, public, tmp_path, min_honest=3)
    grid = _Grid(sorted(branches))
    arrays = _initial()
    for rnd in (1, 2):
        base = {k: v.copy() for k, v in branches[10].seen.items()} or {
            k: arrays[k].numpy() for k in arrays
        }
        out = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))  # type: ignore[arg-type]
        assert all(
            DistributedNoise.from_fields(m.content.config_records[wire.HE_RECORD]) == ddp.noise
            for m in out
        )
        replies = [branches[m.metadata.dst_node_id].handle(m) for m in out]
        new, metrics = strategy.aggregate_train(rnd, replies)
        assert new is not None and metrics is not None
        assert hs.parse_checkpoint(new).count == 3  # type: ignore[union-attr]  # K, not sum n_k
        msgs = strategy.configure_evaluate(rnd, new, ConfigRecord(), grid)  # type: ignore[arg-type]
        strategy.aggregate_evaluate(rnd, [branches[m.metadata.dst_node_id].handle(m) for m in msgs])
        # Expected: base + mean over branches of (clip(step) + the same seeded noise), weight 1.
        flat = wire.flatten(base)
        noise = np.random.default_rng(7).normal(0.0, ddp.noise.branch_std, flat.size)
        updates = [clip_to_norm(np.full(flat.size, b.step), 0.5) + noise for b in branches.values()]
        expected = flat + np.mean(updates, axis=0)
        np.testing.assert_allclose(wire.flatten(branches[11].seen), expected, atol=1e-4)
        arrays = new
    rows = ledger.entries(run_id="r")
    assert [(r.round, r.decision) for r in rows] == [(1, Decision.ADMITTED), (2, Decision.ADMITTED)]
    assert all(r.privacy_unit is PrivacyUnit.BRANCH and r.branch == "federation" for r in rows)
    assert all(r.noise_multiplier == 0.8 and r.clipping_norm == 0.5 for r in rows)
    assert rows[1].cumulative_epsilon > rows[0].cumulative_epsilon > 0


def test_round_with_fewer_than_k_min_branches_is_not_released(
    key_dir: Path, public: he.HEContext, tmp_path: Path
) -> None:
    strategy, ddp, branches, ledger = _setup(key_dir, public, tmp_path, min_honest=3)
    grid = _Grid(sorted(branches))
    out = list(strategy.configure_train(1, _initial(), ConfigRecord(), grid))  # type: ignore[arg-type]
    replies = [branches[m.metadata.dst_node_id].handle(m) for m in out[:2]]  # one dropped out
    new, _ = strategy.aggregate_train(1, replies)
    assert new is None and ddp.he.checkpoints == []
    (row,) = ledger.entries(run_id="r")
    assert row.decision == Decision.REFUSED and "K_min = 3" in (row.reason or "")
    assert ddp.accountant.events == ()


# ------------------------------------------------------------------------------ configuration


def test_guardrail_allows_he_with_distributed_dp_only() -> None:
    assert check_combination(mode=AggregationMode.HE, central_dp=True, distributed_dp=True) == []
    for mode in (AggregationMode.PLAIN, AggregationMode.SECAGG):
        with pytest.raises(CombinationRefused, match="distributed DP without HE"):
            check_combination(mode=mode, central_dp=True, distributed_dp=True)
    with pytest.raises(CombinationRefused, match="mode = 'distributed'"):
        check_combination(mode=AggregationMode.HE, central_dp=True)


def _raw(central: dict[str, object], aggregation: str = "he") -> dict[str, object]:
    return {
        "name": "d",
        "dataset": "synthetic:mlc",
        "partition": {"num-branches": 3},
        "aggregation": {"mode": aggregation},
        "central-dp": central,
    }


def test_toml_distributed_mode() -> None:
    cfg = parse_experiment(_raw({"mode": "distributed", "noise-multiplier": 1.0}))
    assert cfg.central_dp is not None and cfg.central_dp.mode is CentralDPMode.DISTRIBUTED
    assert cfg.min_honest_branches == cfg.federation.min_train_nodes
    cfg = parse_experiment(
        _raw({"mode": "distributed", "noise-multiplier": 1.0, "min-honest-branches": 3})
    )
    assert cfg.min_honest_branches == 3
    with pytest.raises(ConfigError, match="distributed DP without HE"):
        parse_experiment(_raw({"mode": "distributed", "noise-multiplier": 1.0}, "plain"))
    with pytest.raises(ConfigError, match="min-honest-branches"):
        parse_experiment(
            _raw({"mode": "server-fixed", "noise-multiplier": 1.0, "min-honest-branches": 2})
        )


def test_k_min_above_the_branches_is_refused_before_the_federation(tmp_path: Path) -> None:
    """The branches are known once the task has cut them; the run stops before any round."""
    cfg = parse_experiment(
        _raw({"mode": "distributed", "noise-multiplier": 1.0, "min-honest-branches": 4})
    )
    with pytest.raises(ConfigError, match="min-honest-branches"):
        run_experiment(cfg, runs_root=tmp_path)
    assert not list(tmp_path.rglob("metrics.jsonl"))  # no round ran
