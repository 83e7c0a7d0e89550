"""The recommendation round loop: pooled metrics, reply checks, FedAvg over item arrays only."""

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcrm import constants as k
from fedcrm.client.rec_app import make_rec_client_app
from fedcrm.compliance import PrivacyLedger, open_store, sqlite_url
from fedcrm.exceptions import ConfigError
from fedcrm.models.rec_training import RankingMetrics, hit_ratio, ndcg
from fedcrm.server.rec_federation import (
    RecFederationConfig,
    check_item_reply,
    initial_items,
    pool_replies,
    run_rec_federation,
)
from fedcrm.simulation.rec_config import parse_rec_experiment
from fedcrm.simulation.rec_metrics import to_record
from fedcrm.simulation.rec_runner import (
    InProcessGrid,
    RecBranches,
    in_process_identity,
    load_rec_data,
)


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    torch.set_num_threads(1)
    with in_process_identity():
        yield


def _metrics(ranks: list[int], val_ranks: list[int]) -> dict[str, int | float]:
    def sums(r: list[int]) -> RankingMetrics:
        a = np.asarray(r)
        return RankingMetrics(
            k=10,
            count=len(r),
            hr_sampled_sum=float(hit_ratio(a).sum()),
            ndcg_sampled_sum=float(ndcg(a).sum()),
            hr_full_sum=float(hit_ratio(a * 10).sum()),
            ndcg_full_sum=float(ndcg(a * 10).sum()),
        )

    out = to_record(sums(ranks))
    out.update({k.REC_VAL_PREFIX + key: v for key, v in to_record(sums(val_ranks)).items()})
    return out


def _reply(node: int, values: dict[str, int | float]) -> Message:
    request = Message(RecordDict(), dst_node_id=node, message_type="evaluate")
    content = RecordDict({k.METRICS: MetricRecord(values)})  # type: ignore[arg-type]
    return Message(content, reply_to=request)


def test_pooled_metrics_equal_a_hand_computed_example() -> None:
    # Branch A: two users, targets ranked 0 and 3 among the 99 negatives; branch B: one user
    # ranked 12 (a miss). Pooled HR@10 = 2/3, NDCG@10 = (1/log2(2) + 1/log2(5) + 0) / 3.
    # Full catalogue (ranks x10): 0 -> hit, 30 -> miss, 120 -> miss: HR 1/3, NDCG 1/3.
    replies = [_reply(1, _metrics([0, 3], [1, 1])), _reply(2, _metrics([12], [20]))]
    test, val = pool_replies(replies)
    assert test.count == 3
    assert test.hr_sampled == pytest.approx(2 / 3)
    assert test.ndcg_sampled == pytest.approx((1.0 + 1.0 / math.log2(5)) / 3)
    assert test.hr_full == pytest.approx(1 / 3)
    assert test.ndcg_full == pytest.approx(1 / 3)
    assert val.hr_sampled == pytest.approx(2 / 3)
    assert val.ndcg_sampled == pytest.approx(2 / math.log2(3) / 3)


def test_reply_with_user_factors_is_refused() -> None:
    items = initial_items(20, 4, seed=0)
    keys = frozenset(items.keys())
    request = Message(RecordDict(), dst_node_id=3, message_type="train")
    clean = Message(RecordDict({k.ARRAYS: items}), reply_to=request)
    assert check_item_reply(clean, keys) is None
    leaky = ArrayRecord(
        {
            **dict(items.items()),
            "users.embedding.weight": Array(np.zeros((5, 4), dtype=np.float32)),
        }
    )
    reason = check_item_reply(Message(RecordDict({k.ARRAYS: leaky}), reply_to=request), keys)
    assert reason is not None and "users.embedding.weight" in reason


@pytest.mark.parametrize(
    "kwargs",
    [{"num_rounds": 0}, {"lr": 0.0}, {"lr": math.inf}, {"loss": "mse"}, {"weight_decay": -1.0}],
    ids=["rounds", "lr-zero", "lr-inf", "loss", "decay"],
)
def test_config_rejects_out_of_range(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        RecFederationConfig(**kwargs)  # type: ignore[arg-type]


def test_two_rounds_in_process_drop_a_leaking_branch() -> None:
    cfg = parse_rec_experiment(
        {
            "task": "recommendation",
            "name": "unit",
            "dataset": "synthetic",
            "synthetic": {"users": 45, "items": 130, "branches": 3},
            "federation": {"num-rounds": 2, "local-epochs": 1, "factors": 8, "batch-size": 256},
        }
    )
    data = load_rec_data(cfg)
    honest = make_rec_client_app(RecBranches(cfg))
    leaky = ClientApp()

    @leaky.train()
    def train(msg: Message, context: Context) -> Message:
        reply = honest(msg, context)
        arrays = reply.content.array_records[k.ARRAYS]
        user = context.state.array_records[k.STATE_REC_USER_FACTORS]
        arrays["users.embedding.weight"] = user["users.embedding.weight"]
        return reply

    @leaky.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    class Mixed(InProcessGrid):
        def send_and_receive(
            self, messages: object, *, timeout: float | None = None
        ) -> list[Message]:
            out = []
            for msg in messages:  # type: ignore[attr-defined]
                node = msg.metadata.dst_node_id
                app = leaky if node == 3 else honest
                out.append(app(msg, self.contexts[node]))
            return out

    result = run_rec_federation(Mixed(honest, 3), cfg.federation, n_items=data.n_items, min_nodes=3)
    assert [r.train_replies for r in result.rounds] == [2, 2]
    assert all(len(r.rejected) == 1 for r in result.rounds)
    assert set(result.items) == {"items.embedding.weight", "items.bias.weight"}
    first = result.rounds[0]
    assert first.test["users"] == len(data.interactions.counts_per_user().nonzero()[0])
    assert set(first.bytes_up.values()) == {initial_items(data.n_items, 8, seed=0).count_bytes()}


@pytest.mark.filterwarnings("ignore::fedcrm.privacy.dp_sgd.InsecureRNGWarning")
def test_dp_rounds_fill_the_ledger_with_customer_level_rows(tmp_path: Path) -> None:
    cfg = parse_rec_experiment(
        {
            "task": "recommendation",
            "name": "unit-dp",
            "dataset": "synthetic",
            "synthetic": {"users": 45, "items": 130, "branches": 3},
            "federation": {"num-rounds": 2, "local-epochs": 1, "factors": 8, "batch-size": 256},
            "dp": {"target-epsilon": 4.0, "delta": 1e-5, "users-per-step": 100},
        }
    )
    assert cfg.dp is not None
    data = load_rec_data(cfg)
    ledger = PrivacyLedger(open_store(sqlite_url(str(tmp_path / "ledger.db"))))
    grid = InProcessGrid(make_rec_client_app(RecBranches(cfg), tmp_path), len(data.branches))
    result = run_rec_federation(
        grid, cfg.federation, n_items=data.n_items, dp=cfg.dp, ledger=ledger, run_id="r1"
    )

    entries = ledger.entries(run_id="r1")
    assert len(entries) == 2 * len(data.branches)
    assert {str(e.privacy_unit) for e in entries} == {"customer"}
    assert {(e.model, e.purpose) for e in entries} == {("recommender", "recommendation-training")}
    assert all(e.decision == "admitted" and e.delta == 1e-5 for e in entries)
    for branch in {e.branch for e in entries}:
        cumulative = [e.cumulative_epsilon for e in entries if e.branch == branch]
        assert 0 < cumulative[0] < cumulative[1] <= 4.0 + 1e-9  # planned for both rounds
    assert all(r.train_replies == len(data.branches) and not r.rejected for r in result.rounds)
    assert set(result.rounds[-1].epsilon) == {b.name for b in data.branches}
