"""HE aggregation end to end in-process: HEAggregation (server) + HEMod (branches), no Ray."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, Krum
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrm.client.he_mod import HEMod
from fedcrm.exceptions import ConfigError
from fedcrm.privacy import he, keys
from fedcrm.strategies import he as he_strategy
from fedcrm.strategies.validated import ValidatedStrategy
from fedcrm.wire import HE_AGGREGATE, HE_COUNT, HE_RECORD, HE_UPDATE, WEIGHT_UNIT

SHAPES = {"w": (3, 4), "b": (4,)}
Deltas = dict[str, np.ndarray]


pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys") / "he"
    keys.init_keys(folder)
    return folder


@pytest.fixture(scope="module")
def public(key_dir: Path) -> he.HEContext:
    return keys.load_public_context(keys.current_generation(key_dir).public_path)


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _fedavg(n: int) -> FedAvg:
    return FedAvg(min_available_nodes=n, min_train_nodes=n, min_evaluate_nodes=n)


def _initial(seed: int = 0) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord(
        {k: Array(rng.normal(0, 0.5, size=s).astype(np.float32)) for k, s in SHAPES.items()}
    )


class Branch:
    """A simulated branch: the HE mod around a handler that adds a fixed delta when training."""

    def __init__(self, node_id: int, mod: HEMod, count: float, delta: Deltas) -> None:
        self.node_id = node_id
        self.mod = mod
        self.count = count
        self.delta = delta
        self.context = Context(1, node_id, {}, RecordDict(), {})
        self.seen: dict[str, np.ndarray] = {}

    def _handler(self, msg: Message, _ctxt: Context) -> Message:
        record = msg.content.array_records["arrays"]
        self.seen = {k: record[k].numpy().copy() for k in record}
        if msg.metadata.message_type == "train":
            local = {k: (v + self.delta[k]).astype(np.float32) for k, v in self.seen.items()}
            content = RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v) for k, v in local.items()}),
                    "metrics": MetricRecord({"num-examples": self.count, "train-loss": 1.0}),
                }
            )
        else:
            content = RecordDict({"metrics": MetricRecord({"num-examples": 5, "loss": 0.5})})
        return Message(content, reply_to=msg)

    def handle(self, msg: Message) -> Message:
        return self.mod(msg, self.context, self._handler)


def _run_round(
    strategy: ValidatedStrategy,
    branches: dict[int, Branch],
    rnd: int,
    arrays: ArrayRecord,
    tamper: Callable[[Message], Message] = lambda m: m,
) -> ArrayRecord | None:
    grid = _Grid(sorted(branches))
    out = strategy.configure_train(rnd, arrays, ConfigRecord(), grid)  # type: ignore[arg-type]
    replies = [tamper(branches[m.metadata.dst_node_id].handle(m)) for m in out]
    new, _ = strategy.aggregate_train(rnd, replies)
    if new is not None:
        msgs = strategy.configure_evaluate(rnd, new, ConfigRecord(), grid)  # type: ignore[arg-type]
        strategy.aggregate_evaluate(rnd, [branches[m.metadata.dst_node_id].handle(m) for m in msgs])
    return new


def _deltas(rng: np.random.Generator, scale: float = 0.05) -> Deltas:
    return {k: rng.normal(0, scale, size=s).astype(np.float32) for k, s in SHAPES.items()}


def _plain_fedavg(base: ArrayRecord, branches: list[Branch]) -> dict[str, np.ndarray]:
    """Flower's own plaintext FedAvg on the same local models (the NumPy reference)."""
    replies = []
    for b in branches:
        local = {k: (base[k].numpy() + b.delta[k]).astype(np.float32) for k in base}
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in local.items()}),
                "metrics": MetricRecord({"num-examples": b.count}),
            }
        )
        replies.append(Message(content, dst_node_id=0, message_type="train"))
    arrays, _ = _fedavg(len(branches)).aggregate_train(1, replies)
    assert arrays is not None
    return {k: arrays[k].numpy() for k in arrays}


def _setup(
    key_dir: Path, public: he.HEContext, counts: list[float], seed: int = 1
) -> tuple[ValidatedStrategy, he_strategy.HEAggregation, dict[int, Branch]]:
    rng = np.random.default_rng(seed)
    mod = HEMod(key_dir)
    branches = {10 + i: Branch(10 + i, mod, c, _deltas(rng)) for i, c in enumerate(counts)}
    inner = he_strategy.HEAggregation(_fedavg(len(counts)), public_context=public)
    return ValidatedStrategy(inner), inner, branches


# ------------------------------------------------------------------------------ correctness


@settings(max_examples=5, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1), counts=st.lists(st.integers(1, 2000), min_size=1, max_size=5)
)
def test_encrypted_round_equals_plaintext_fedavg(
    key_dir: Path, public: he.HEContext, seed: int, counts: list[int]
) -> None:
    strategy, inner, branches = _setup(key_dir, public, [float(c) for c in counts], seed)
    initial = _initial(seed)
    new = _run_round(strategy, branches, 1, initial)
    assert new is not None and inner.rejections == [] and strategy.rejections == []
    expected = _plain_fedavg(initial, list(branches.values()))
    # CKKS's absolute error is scaled by WEIGHT_UNIT / sum(counts) when the branch divides.
    atol = 2e-6 * max(1.0, WEIGHT_UNIT / sum(counts))
    for branch in branches.values():  # every branch evaluated the same, correct model
        for name in SHAPES:
            np.testing.assert_allclose(branch.seen[name], expected[name], atol=atol)


def test_two_rounds_chain_and_replay(key_dir: Path, public: he.HEContext, tmp_path: Path) -> None:
    strategy, inner, branches = _setup(key_dir, public, [100.0, 300.0, 50.0])
    inner.checkpoint_dir = tmp_path / "ckpt"
    initial = _initial()
    first = _run_round(strategy, branches, 1, initial)
    assert first is not None
    after_one = {k: v.copy() for k, v in branches[10].seen.items()}
    second = _run_round(strategy, branches, 2, first)
    assert second is not None
    # Round 2 started from the round-1 model: expected = FedAvg applied twice.
    base = ArrayRecord({k: Array(v) for k, v in after_one.items()})
    expected = _plain_fedavg(base, list(branches.values()))
    for name in SHAPES:
        np.testing.assert_allclose(branches[11].seen[name], expected[name], atol=2e-6)
    # The server's checkpoints replay into the same model with the secret key.
    secret = keys.load_secret_context(keys.current_generation(key_dir).secret_path)
    replayed = he_strategy.replay_global_model(
        {k: initial[k].numpy() for k in initial}, inner.checkpoints, secret
    )
    for name in SHAPES:
        np.testing.assert_array_equal(replayed[name], branches[12].seen[name])
    assert sorted(p.name for p in inner.checkpoint_dir.iterdir()) == [
        "round-0001.count",
        "round-0001.fche",
        "round-0002.count",
        "round-0002.fche",
    ]


def test_server_holds_only_ciphertext(key_dir: Path, public: he.HEContext) -> None:
    strategy, inner, branches = _setup(key_dir, public, [10.0, 20.0])
    initial = _initial()
    new = _run_round(strategy, branches, 1, initial)
    assert new is not None
    assert set(new.keys()) == {"he-ciphertext", "he-count", "he-round"}
    ckpt = he_strategy.parse_checkpoint(new)
    assert ckpt is not None and ckpt.count == 30 and ckpt.server_round == 1
    with pytest.raises(he.ContextKindError):
        he.decrypt(inner.context, he.EncryptedUpdate.from_bytes(ckpt.ciphertext))
    # Round-2 messages carry the ciphertext and no ArrayRecord at all.
    msgs = list(strategy.configure_train(2, new, ConfigRecord(), _Grid([10, 11])))  # type: ignore[arg-type]
    for msg in msgs:
        assert not msg.content.array_records
        fields = msg.content.config_records[HE_RECORD]
        assert fields[HE_AGGREGATE] == ckpt.ciphertext
        assert fields[HE_COUNT] == 30


def test_branch_replies_carry_no_plaintext(key_dir: Path, public: he.HEContext) -> None:
    _, inner, branches = _setup(key_dir, public, [10.0])
    (msg,) = inner.configure_train(1, _initial(), ConfigRecord(), _Grid([10]))  # type: ignore[arg-type]
    reply = branches[10].handle(msg)
    assert not reply.has_error()
    assert not reply.content.array_records
    assert set(reply.content.config_records) == {HE_RECORD}


def test_server_refuses_a_secret_context(key_dir: Path) -> None:
    secret = keys.load_secret_context(keys.current_generation(key_dir).secret_path)
    with pytest.raises(he.ContextKindError, match="secret key"):
        he_strategy.HEAggregation(_fedavg(2), public_context=secret)


@pytest.mark.parametrize(
    "inner",
    [FedAdam(), Krum(), FedMedian()],
    ids=["fedadam", "krum", "median"],
)
def test_server_refuses_strategies_that_need_plaintext(public: he.HEContext, inner: FedAvg) -> None:
    with pytest.raises(ConfigError, match="FedAvg or FedProx"):
        he_strategy.HEAggregation(inner, public_context=public)


def test_fedprox_is_accepted(public: he.HEContext) -> None:
    he_strategy.HEAggregation(FedProx(proximal_mu=0.1), public_context=public)


# ------------------------------------------------------------------------------ bad input


def _swap_update(reply: Message, wire: bytes) -> Message:
    reply.content.config_records[HE_RECORD][HE_UPDATE] = wire
    return reply


def _wire(reply: Message) -> bytes:
    value = reply.content.config_records[HE_RECORD][HE_UPDATE]
    assert isinstance(value, bytes)
    return value


def _foreign_wire(_: Message) -> bytes:
    other = he.create_contexts()
    return he.encrypt_update(other.secret, np.zeros(16), key_id=other.key_id).to_bytes()


def _other_params_wire(reply: Message) -> bytes:
    # The right key id; the envelope names other CKKS parameters.
    upd = he.EncryptedUpdate.from_bytes(_wire(reply))
    other = he.CKKSParameters(scale_bits=36).fingerprint
    return he.EncryptedUpdate(
        upd.key_id, other, upd.length, 1, upd.chunks, upd.checksums
    ).to_bytes()


def _wrong_chunks(reply: Message) -> bytes:
    upd = he.EncryptedUpdate.from_bytes(_wire(reply))
    return he.EncryptedUpdate(
        upd.key_id, upd.params_fingerprint, upd.length, 1, upd.chunks * 2, upd.checksums * 2
    ).to_bytes()


def _out_of_range(reply: Message) -> bytes:
    import zlib

    upd = he.EncryptedUpdate.from_bytes(_wire(reply))
    chunk = bytearray(upd.chunks[0])
    chunk[0:8] = (2**64 - 1).to_bytes(8, "little")  # valid CRC, not a ciphertext mod q
    return he.EncryptedUpdate(
        upd.key_id, upd.params_fingerprint, upd.length, 1, (bytes(chunk),), (zlib.crc32(chunk),)
    ).to_bytes()


def _count(value: float) -> Callable[[Message], Message]:
    def tamper(reply: Message) -> Message:
        reply.content.metric_records["metrics"]["num-examples"] = value
        return reply

    return tamper


BAD: dict[str, tuple[Callable[[Message], Message], str]] = {
    "unknown-key": (lambda r: _swap_update(r, _foreign_wire(r)), "unknown"),
    "truncated": (lambda r: _swap_update(r, _wire(r)[:-100]), "truncated"),
    "corrupted": (
        lambda r: _swap_update(r, _wire(r)[:-5] + bytes([_wire(r)[-5] ^ 1]) + _wire(r)[-4:]),
        "CRC",
    ),
    "wrong-chunk-count": (lambda r: _swap_update(r, _wrong_chunks(r)), "chunks"),
    "parameter-mismatch": (lambda r: _swap_update(r, _other_params_wire(r)), "parameters"),
    "not-a-ciphertext": (lambda r: _swap_update(r, _out_of_range(r)), "modulus"),
    "zero-count": (_count(0), "> 0"),
    "negative-count": (_count(-5), "> 0"),
}


@pytest.mark.parametrize("case", sorted(BAD), ids=sorted(BAD))
def test_bad_update_is_left_out_and_named(key_dir: Path, public: he.HEContext, case: str) -> None:
    tamper, match = BAD[case]
    strategy, inner, branches = _setup(key_dir, public, [100.0, 200.0, 300.0])
    initial = _initial()
    new = _run_round(
        strategy,
        branches,
        1,
        initial,
        tamper=lambda r: tamper(r) if r.metadata.src_node_id == 11 else r,
    )
    assert new is not None
    rejected = [(r.server_round, r.node_id, r.reason) for r in strategy.rejections] + [
        (r.server_round, r.node_id, r.reason) for r in inner.rejections
    ]
    assert [(rnd, node) for rnd, node, _ in rejected] == [(1, 11)], rejected
    assert match in rejected[0][2]
    # The others' sum is intact: exactly FedAvg over branches 10 and 12.
    expected = _plain_fedavg(initial, [branches[10], branches[12]])
    ckpt = he_strategy.parse_checkpoint(new)
    assert ckpt is not None and ckpt.count == 400
    for name in SHAPES:
        np.testing.assert_allclose(branches[12].seen[name], expected[name], atol=2e-6)


def test_stale_key_after_rotation_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    keys.init_keys(folder)
    old_mod = HEMod(folder)
    old_secret = keys.load_secret_context(keys.current_generation(folder).secret_path)
    keys.rotate_keys(folder)
    server = keys.load_public_context(keys.current_generation(folder).public_path)
    strategy = ValidatedStrategy(he_strategy.HEAggregation(_fedavg(2), public_context=server))
    rng = np.random.default_rng(0)
    branches = {
        10: Branch(10, HEMod(folder), 5.0, _deltas(rng)),
        11: Branch(11, old_mod, 5.0, _deltas(rng)),
    }

    def stale(reply: Message) -> Message:
        if reply.metadata.src_node_id != 11:
            return reply
        wire = he.encrypt_update(old_secret, np.zeros(16), key_id=old_secret.key_id).to_bytes()
        return _swap_update(reply, wire)

    new = _run_round(strategy, branches, 1, _initial(), tamper=stale)
    assert new is not None
    (rej,) = strategy.rejections
    assert rej.node_id == 11 and "generation 1" in rej.reason and "rotated out" in rej.reason


def test_plaintext_reply_is_refused(key_dir: Path, public: he.HEContext) -> None:
    strategy, _, branches = _setup(key_dir, public, [10.0, 20.0])

    def leak(reply: Message) -> Message:
        if reply.metadata.src_node_id == 10:
            reply.content["arrays"] = _initial()
        return reply

    _run_round(strategy, branches, 1, _initial(), tamper=leak)
    (rej,) = strategy.rejections
    assert rej.node_id == 10 and "plaintext" in rej.reason


def test_round_with_no_valid_update_returns_none(key_dir: Path, public: he.HEContext) -> None:
    strategy, _, branches = _setup(key_dir, public, [10.0, 20.0])
    assert _run_round(strategy, branches, 1, _initial(), tamper=_count(0)) is None
    assert len(strategy.rejections) == 2


def test_tenseal_engine_gives_the_same_round(key_dir: Path, public: he.HEContext) -> None:
    models = []
    for engine in ("numpy", "tenseal"):
        strategy, inner, branches = _setup(key_dir, public, [30.0, 70.0], seed=3)
        inner.engine = engine  # type: ignore[assignment]
        assert _run_round(strategy, branches, 1, _initial()) is not None
        models.append(branches[10].seen)
    for name in SHAPES:
        np.testing.assert_allclose(models[0][name], models[1][name], atol=2e-6)
