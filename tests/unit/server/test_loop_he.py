"""Encrypted aggregation in the round loop, for every task, in process (no Ray).

The HE run is compared with a plaintext run of the same settings, whose FedAvg reference is
recomputed here from the branches' own plaintext replies (example-weighted mean). Local
training is deterministic (one torch thread, per-round seeds), so after round 1 the two differ
only by CKKS noise and float32 rounding; round 2 trains from those slightly different models
and stays as close.
"""

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

from conftest import TASK_IDS, Federation, build_federation, small_experiment
from fedcrm import wire as k
from fedcrm.client import HEMod, make_client_app
from fedcrm.compliance import PrivacyLedger, open_store, sqlite_url
from fedcrm.privacy import DPSGDConfig, InsecureRNGWarning
from fedcrm.privacy.he import EncryptedUpdate
from fedcrm.privacy.keys import KeyGeneration, init_keys, load_public_context, load_secret_context
from fedcrm.server import AggregationConfig, FederationResult, Wiring, run_federation
from fedcrm.simulation import InProcessGrid, partition_nodes
from fedcrm.simulation.runner import released_model
from fedcrm.strategies import AggregationMode, replay_global_model
from fedcrm.tasks import get_task

ROUNDS = 2
parametrize_tasks = pytest.mark.parametrize("task_name", TASK_IDS)


class RecordingGrid(InProcessGrid):
    """`InProcessGrid` noting what each message carried before a mod could replace it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.carried: list[tuple[int | None, dict[str, list[str]]]] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        out = list(messages)
        for msg in out:
            he = msg.content.config_records.get(k.HE_RECORD)
            arrays = {name: list(rec) for name, rec in msg.content.array_records.items()}
            self.carried.append((None if he is None else int(he[k.HE_ROUND]), arrays))  # type: ignore[arg-type]
        return super().send_and_receive(out, timeout=timeout)


def _train_replies(grid: InProcessGrid) -> list[Message]:
    return [r for r in grid.replies if r.metadata.message_type == MessageType.TRAIN]


def _run(
    fed: Federation,
    keys: KeyGeneration | None,
    *,
    mods: list[Mod] | None = None,
    **kwargs: Any,
) -> tuple[FederationResult, RecordingGrid, Wiring | None]:
    wiring = None
    if keys is not None:
        wiring = Wiring(
            AggregationConfig(mode=AggregationMode.HE),
            None,
            rounds=fed.federation.num_rounds,
            run_id="he",
            ledger_url="sqlite://",
            round_timeout=5,
            public_context=load_public_context(keys.public_path),
        )
        mods = [*(mods or []), HEMod(keys.public_path.parent.parent)]  # the key directory
    app = make_client_app(fed.branches, simulation=fed.simulated.handle, mods=mods or [])
    grid = RecordingGrid(app, partition_nodes(3))
    result = run_federation(
        grid,
        fed.federation,
        fed.settings,
        min_nodes=3,
        wrap_strategy=None if wiring is None else wiring.wrap,
        **kwargs,
    )
    return result, grid, wiring


def _fedavg_by_round(grid: InProcessGrid) -> list[dict[str, Any]]:
    """Plaintext FedAvg of each round, from that round's plaintext train replies."""
    replies = _train_replies(grid)
    assert len(replies) == ROUNDS * 3
    out = []
    for rnd in range(ROUNDS):
        chunk = replies[rnd * 3 : (rnd + 1) * 3]
        counts = [float(r.content.metric_records[k.METRICS][k.KEY_NUM_EXAMPLES]) for r in chunk]  # type: ignore[arg-type]
        arrays = [r.content.array_records[k.ARRAYS] for r in chunk]
        out.append(
            {
                name: sum(
                    c * a[name].numpy().astype(np.float64)
                    for c, a in zip(counts, arrays, strict=True)
                )
                / sum(counts)
                for name in arrays[0]
            }
        )
    return out


@pytest.fixture
def keys(tmp_path: Path) -> KeyGeneration:
    return init_keys(tmp_path / "keys")


@parametrize_tasks
def test_he_model_matches_plaintext_fedavg(federation: Federation, keys: KeyGeneration) -> None:
    plain, plain_grid, _ = _run(federation, None)
    enc, _, wiring = _run(federation, keys)
    assert wiring is not None and wiring.he is not None and wiring.he.initial is not None
    assert enc.arrays == {}  # the server holds no plaintext model
    assert [c.server_round for c in wiring.he.checkpoints] == list(range(1, ROUNDS + 1))
    reference = _fedavg_by_round(plain_grid)
    secret = load_secret_context(keys.secret_path)
    bound = 0.0
    for rnd in range(1, ROUNDS + 1):
        got = replay_global_model(wiring.he.initial, wiring.he.checkpoints[:rnd], secret)
        assert list(got) == list(wiring.he.initial)  # every shared array, in the model's order
        count = wiring.he.checkpoints[rnd - 1].count
        # Round 1: the same inputs; CKKS's absolute error on the summed pre-weighted deltas,
        # rescaled by WEIGHT_UNIT / count, plus float32 rounding of the two averages.
        bound = secret.params.error_bound(3) * k.WEIGHT_UNIT / count + 1e-6
        tolerance = bound if rnd == 1 else 20 * bound
        for name, value in got.items():
            diff = np.abs(value.astype(np.float64) - reference[rnd - 1][name]).max()
            assert diff <= tolerance, (rnd, name, diff, tolerance)
    # The key holder's replay of the released round (what a simulation writes).
    released = released_model(enc, wiring, keys)
    best = replay_global_model(wiring.he.initial, wiring.he.checkpoints[: enc.best_round], secret)
    assert set(released) == set(best) == set(plain.arrays)
    task = get_task(federation.federation.task)
    _, headline = task.headline(federation.settings)
    for a, b in zip(plain.rounds, enc.rounds, strict=True):
        assert a.evaluate[headline] == pytest.approx(b.evaluate[headline], abs=0.03)


@parametrize_tasks
def test_he_train_replies_carry_no_plaintext(federation: Federation, keys: KeyGeneration) -> None:
    _, grid, wiring = _run(federation, keys)
    assert wiring is not None and wiring.he is not None and wiring.he.initial is not None
    train = _train_replies(grid)
    assert len(train) == ROUNDS * 3
    for reply in train:
        content = reply.content
        assert not reply.has_error()
        assert not content.array_records  # no model arrays, no user factors
        assert set(content.config_records) == {k.HE_RECORD}
        assert set(content.config_records[k.HE_RECORD]) == {k.HE_UPDATE, k.HE_KEY_ID}
        wire = content.config_records[k.HE_RECORD][k.HE_UPDATE]
        assert isinstance(wire, bytes)
        update = EncryptedUpdate.from_bytes(wire)
        assert update.key_id == keys.key_id and update.summands == 1
        assert update.length == sum(a.size for a in wiring.he.initial.values())
    for reply in grid.replies:
        assert not reply.content.array_records
    # After the plaintext (public, seeded) initial model of round 1's training, the server
    # sends only the encrypted aggregate (the statistics query carries no model).
    rounds = [c for c in grid.carried if c[0] is not None]
    first = [arrays for he_round, arrays in rounds if he_round == 0]
    later = [arrays for he_round, arrays in rounds if he_round != 0]
    assert len(first) == 3 and all(list(a) == [k.ARRAYS] for a in first)
    assert len(later) == (2 * ROUNDS - 1) * 3 and not any(later)


def _leak_after_encryption(node: int) -> Mod:
    """A mod outside the HE mod: appends plaintext arrays to node ``node``'s encrypted reply."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if context.node_id == node and msg.metadata.message_type == MessageType.TRAIN:
            reply.content[k.ARRAYS] = ArrayRecord({"leak": Array(np.zeros(4, np.float32))})
        return reply

    return mod


@parametrize_tasks
def test_he_server_refuses_a_reply_with_plaintext_arrays(
    federation: Federation, keys: KeyGeneration
) -> None:
    result, _, wiring = _run(federation, keys, mods=[_leak_after_encryption(3)])
    assert wiring is not None and wiring.he is not None
    assert [r.train_replies for r in result.rounds] == [3] * ROUNDS
    assert all(len(r.rejected) == 1 and "plaintext arrays" in r.rejected[0] for r in result.rounds)
    assert [c.server_round for c in wiring.he.checkpoints] == list(range(1, ROUNDS + 1))


@parametrize_tasks
def test_he_with_dp_sgd(federation: Federation, keys: KeyGeneration, tmp_path: Path) -> None:
    task = get_task(federation.federation.task)
    dp = DPSGDConfig(target_epsilon=4.0, delta=1e-5, model=task.model_name, purpose=task.purpose)
    ledger = PrivacyLedger(open_store(sqlite_url(tmp_path / "ledger.db")))
    with pytest.warns(InsecureRNGWarning):
        result, grid, wiring = _run(federation, keys, dp=dp, ledger=ledger, run_id="r1")
    assert all(r.train_replies == 3 and not r.rejected for r in result.rounds)
    assert len(ledger.entries(run_id="r1")) == ROUNDS * 3
    for reply in _train_replies(grid):
        assert not reply.content.array_records
        assert set(reply.content.config_records) == {k.PRIVACY, k.HE_RECORD}
    assert wiring is not None
    model = released_model(result, wiring, keys)
    assert all(np.isfinite(a).all() for a in model.values())


def test_he_carries_every_shared_array_of_a_history_model(
    tmp_path: Path, keys: KeyGeneration, task_identity: None, one_thread: None
) -> None:
    """A history model shares more than item factors and biases; HE carries all of them."""
    raw = small_experiment("recommendation", federation={"history-length": 2})
    fed = build_federation(tmp_path, raw)
    plain, _, _ = _run(fed, None)
    enc, _, wiring = _run(fed, keys)
    assert wiring is not None and len(plain.arrays) > 2
    final = released_model(enc, wiring, keys)
    assert list(final) == list(plain.arrays) and enc.best_round == plain.best_round
    for name, value in final.items():  # CKKS noise of two rounds, carried through training
        np.testing.assert_allclose(value, plain.arrays[name], rtol=0, atol=1e-4)
