"""Encrypted aggregation of the recommendation item tower, in process (no Ray).

The same round loop and ClientApp as a simulation, on synthetic interactions (3 branches). The
HE run is compared with a plaintext run of the same settings, whose FedAvg reference is
recomputed here from the branches' own plaintext replies (example-weighted mean, as
``support.plaintext_fedavg`` does for churn). Local training is deterministic (one torch
thread, per-round seeds), so after round 1 the two differ only by CKKS noise and float32
rounding; round 2 trains from those slightly different items and stays as close.
"""

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedcrm import constants as k
from fedcrm.client.rec_app import make_rec_client_app
from fedcrm.compliance import PrivacyLedger, open_store, sqlite_url
from fedcrm.exceptions import FedCrmError
from fedcrm.privacy.he import EncryptedUpdate
from fedcrm.privacy.keys import load_secret_context
from fedcrm.server.rec_federation import RecFederationResult, run_rec_federation
from fedcrm.simulation.rec_config import RecExperimentConfig, parse_rec_experiment
from fedcrm.simulation.rec_he import RecHESetup, replay_items, setup_rec_he
from fedcrm.simulation.rec_runner import (
    InProcessGrid,
    RecBranches,
    in_process_identity,
    load_rec_data,
)
from fedcrm.strategies.he import (
    HE_KEY_ID,
    HE_RECORD,
    HE_UPDATE,
    WEIGHT_UNIT,
    replay_global_model,
)

ROUNDS = 2
RAW = {
    "task": "recommendation",
    "name": "unit-he",
    "dataset": "synthetic",
    "synthetic": {"users": 45, "items": 130, "branches": 3},
    "federation": {"num-rounds": ROUNDS, "local-epochs": 1, "factors": 8, "batch-size": 256},
}


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    torch.set_num_threads(1)
    with in_process_identity():
        yield


class RecordingGrid(InProcessGrid):
    """`InProcessGrid` that keeps every reply and what each message sent carried, in order.

    Messages are handed over as objects and a mod may replace their content, so what the
    server sent is noted before delivery: (HE round or None, {array record: array names}).
    """

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        super().__init__(client_app, num_nodes)
        self.sent: list[tuple[int | None, dict[str, list[str]]]] = []
        self.replies: list[Message] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        out = list(messages)
        for msg in out:
            he = msg.content.config_records.get(HE_RECORD)
            arrays = {name: list(rec) for name, rec in msg.content.array_records.items()}
            self.sent.append((None if he is None else int(he["he-round"]), arrays))  # type: ignore[arg-type]
        replies = list(super().send_and_receive(out, timeout=timeout))
        self.replies.extend(replies)
        return replies


def _train_replies(grid: RecordingGrid) -> list[Message]:
    return [r for r in grid.replies if r.metadata.message_type.startswith("train")]


def _run(
    cfg: RecExperimentConfig,
    he: RecHESetup | None,
    branches_root: Path | None = None,
    **kwargs: object,
) -> tuple[RecFederationResult, RecordingGrid]:
    data = load_rec_data(cfg)
    app = make_rec_client_app(RecBranches(cfg), branches_root, mods=() if he is None else (he.mod,))
    grid = RecordingGrid(app, len(data.branches))
    result = run_rec_federation(
        grid,
        cfg.federation,
        n_items=data.n_items,
        min_nodes=len(data.branches),
        he=None if he is None else he.server,
        **kwargs,  # type: ignore[arg-type]
    )
    return result, grid


def _fedavg_by_round(grid: RecordingGrid, rounds: int, branches: int) -> list[dict[str, Any]]:
    """Plaintext FedAvg of each round, from that round's plaintext train replies."""
    replies = _train_replies(grid)
    assert len(replies) == rounds * branches
    out = []
    for rnd in range(rounds):
        chunk = replies[rnd * branches : (rnd + 1) * branches]
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


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[RecFederationResult, RecordingGrid, RecFederationResult, RecordingGrid, RecHESetup]:
    cfg = parse_rec_experiment(RAW)
    with in_process_identity():
        torch.set_num_threads(1)
        plain, plain_grid = _run(cfg, None)
        setup = setup_rec_he(tmp_path_factory.mktemp("he-run"))
        enc, enc_grid = _run(cfg, setup)
    return plain, plain_grid, enc, enc_grid, setup


def test_he_items_match_plaintext_fedavg(runs: tuple) -> None:  # type: ignore[type-arg]
    plain, plain_grid, enc, _enc_grid, setup = runs
    assert (enc.aggregation, enc.items) == ("he", {})  # the server holds no plaintext model
    assert [c.server_round for c in enc.checkpoints] == list(range(1, ROUNDS + 1))
    reference = _fedavg_by_round(plain_grid, ROUNDS, plain.num_branches)
    # The loop's own plaintext FedAvg is the hand-computed weighted mean.
    for name, value in plain.items.items():
        np.testing.assert_allclose(value, reference[-1][name], rtol=0, atol=1e-6)
    secret = load_secret_context(setup.keys.secret_path)
    params = secret.params
    for rnd in range(1, ROUNDS + 1):
        got = replay_global_model(enc.initial, enc.checkpoints[:rnd], secret)
        assert list(got) == list(enc.initial)  # every item array, in the model's order
        count = enc.checkpoints[rnd - 1].count
        # Round 1: the same inputs; CKKS's absolute error on the summed pre-weighted deltas,
        # rescaled by WEIGHT_UNIT / count, plus float32 rounding of the two averages.
        # Round 2 trains from items that differ by that much: allow a few times more.
        bound = params.error_bound(plain.num_branches) * WEIGHT_UNIT / count + 1e-6
        tolerance = bound if rnd == 1 else 20 * bound
        for name, value in got.items():
            diff = np.abs(value.astype(np.float64) - reference[rnd - 1][name]).max()
            assert diff <= tolerance, (rnd, name, diff, tolerance)
    final = replay_items(enc, setup.keys.secret_path)
    assert set(final) == set(plain.items)
    for name, value in final.items():
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, plain.items[name], rtol=0, atol=20 * bound)
    # Ranking metrics of the two runs agree (to within one of the ~45 evaluated users).
    for a, b in zip(plain.rounds, enc.rounds, strict=True):
        assert a.test["hr10-sampled"] == pytest.approx(b.test["hr10-sampled"], abs=0.03)


def test_he_train_replies_carry_no_plaintext(runs: tuple) -> None:  # type: ignore[type-arg]
    _plain, plain_grid, enc, enc_grid, setup = runs
    train = _train_replies(enc_grid)
    assert len(train) == ROUNDS * enc.num_branches
    for reply in train:
        content = reply.content
        assert not reply.has_error()
        assert not content.array_records  # no item arrays, no user factors
        assert set(content.config_records) == {HE_RECORD}
        assert set(content.config_records[HE_RECORD]) == {HE_UPDATE, HE_KEY_ID}
        assert set(content.metric_records[k.METRICS]) == {k.KEY_NUM_EXAMPLES, k.KEY_TRAIN_LOSS}
        wire = content.config_records[HE_RECORD][HE_UPDATE]
        assert isinstance(wire, bytes)
        update = EncryptedUpdate.from_bytes(wire)
        assert update.key_id == setup.keys.key_id and update.summands == 1
        assert update.length == sum(a.size for a in enc.initial.values())
    # Evaluate replies are metrics only; nothing sent either way names a user array.
    for reply in enc_grid.replies:
        assert not reply.content.array_records
    assert all(he_round is not None for he_round, _ in enc_grid.sent)
    for _, arrays in enc_grid.sent:
        assert not any("user" in name for names in arrays.values() for name in names)
    # After the plaintext (public, seeded) initial items of round 1's training, the server
    # sends only the encrypted aggregate: no plaintext item tower.
    first = [arrays for he_round, arrays in enc_grid.sent if he_round == 0]
    later = [arrays for he_round, arrays in enc_grid.sent if he_round != 0]
    assert len(first) == enc.num_branches and all(list(a) == [k.ARRAYS] for a in first)
    assert len(later) == (2 * ROUNDS - 1) * enc.num_branches and not any(later)
    # Bytes: the ciphertext of the update against the float32 arrays of the plaintext run.
    plain_up = {v for r in _plain.rounds for v in r.bytes_up.values()}
    enc_up = {v for r in enc.rounds for v in r.bytes_up.values()}
    assert len(plain_up) == 1 and min(enc_up) > max(plain_up)
    wires = {len(r.content.config_records[HE_RECORD][HE_UPDATE]) for r in train}  # type: ignore[arg-type]
    assert enc_up == wires
    assert all(v > 0 for r in enc.rounds for v in r.bytes_down.values())
    assert plain_grid is not enc_grid


def test_he_server_refuses_a_reply_with_plaintext_arrays(tmp_path: Path) -> None:
    cfg = parse_rec_experiment(RAW)
    data = load_rec_data(cfg)
    setup = setup_rec_he(tmp_path)
    honest = make_rec_client_app(RecBranches(cfg), mods=(setup.mod,))
    leaky = ClientApp()

    @leaky.train()
    def train(msg: Message, context: Context) -> Message:
        reply = honest(msg, context)  # encrypted, then the user factors appended in clear
        user = context.state.array_records[k.STATE_REC_USER_FACTORS]
        reply.content[k.ARRAYS] = ArrayRecord({name: Array(user[name].numpy()) for name in user})
        return reply

    @leaky.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    class Mixed(InProcessGrid):
        def send_and_receive(
            self, messages: Iterable[Message], *, timeout: float | None = None
        ) -> list[Message]:
            return [
                (leaky if m.metadata.dst_node_id == 3 else honest)(
                    m, self.contexts[m.metadata.dst_node_id]
                )
                for m in messages
            ]

    result = run_rec_federation(
        Mixed(honest, 3), cfg.federation, n_items=data.n_items, min_nodes=3, he=setup.server
    )
    assert [r.train_replies for r in result.rounds] == [2] * ROUNDS
    assert all(len(r.rejected) == 1 and "plaintext arrays" in r.rejected[0] for r in result.rounds)
    assert [c.server_round for c in result.checkpoints] == list(range(1, ROUNDS + 1))


@pytest.mark.filterwarnings("ignore::fedcrm.privacy.dp_sgd.InsecureRNGWarning")
def test_he_with_customer_level_dp(tmp_path: Path) -> None:
    cfg = parse_rec_experiment(
        {
            **RAW,
            "name": "unit-he-dp",
            "dp": {"target-epsilon": 4.0, "delta": 1e-5, "users-per-step": 100},
            "aggregation": {"mode": "he"},
        }
    )
    assert cfg.dp is not None
    ledger = PrivacyLedger(open_store(sqlite_url(str(tmp_path / "ledger.db"))))
    setup = setup_rec_he(tmp_path / "run")
    result, grid = _run(
        cfg, setup, tmp_path / "branches", dp=cfg.dp, ledger=ledger, run_id="r1"
    )  # the branches' accountants live in branches/<name>/privacy
    assert all(r.train_replies == result.num_branches and not r.rejected for r in result.rounds)
    assert len(ledger.entries(run_id="r1")) == ROUNDS * result.num_branches
    for reply in _train_replies(grid):
        assert not reply.content.array_records
        assert set(reply.content.config_records) == {k.PRIVACY, HE_RECORD}
    items = replay_items(result, setup.keys.secret_path)
    assert all(np.isfinite(a).all() for a in items.values())


def test_replay_refuses_a_plaintext_result(runs: tuple) -> None:  # type: ignore[type-arg]
    plain, _grid, _enc, _enc_grid, setup = runs
    with pytest.raises(FedCrmError, match="not an encrypted run"):
        replay_items(plain, setup.keys.secret_path)


def test_he_carries_every_shared_array_of_a_history_model(tmp_path: Path) -> None:
    # With a history context the model shares more arrays than item factors and biases; the
    # HE path treats the shared state as a generic mapping and must carry all of them.
    raw = {**RAW, "federation": {**RAW["federation"], "history-length": 2}}  # type: ignore[dict-item]
    cfg = parse_rec_experiment(raw)
    plain, _ = _run(cfg, None)
    setup = setup_rec_he(tmp_path)
    enc, _ = _run(cfg, setup)
    assert len(plain.items) > 2 and list(enc.initial) == list(plain.items)
    final = replay_items(enc, setup.keys.secret_path)
    for name, value in final.items():
        np.testing.assert_allclose(value, plain.items[name], rtol=0, atol=1e-5)
