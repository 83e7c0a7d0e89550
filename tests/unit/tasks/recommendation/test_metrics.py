"""Pooling branch ranking metrics is exact, the record forms round-trip, any cut-off works."""

from pathlib import Path

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict

from fedcrm import wire as k
from fedcrm.data.interactions import synthetic_interactions
from fedcrm.data.movielens import leave_one_out, sample_negatives
from fedcrm.exceptions import InconsistentReplies
from fedcrm.models.rec_training import RankingMetrics, evaluate_scores
from fedcrm.tasks import RoundContext
from fedcrm.tasks.recommendation.data import RecBranch
from fedcrm.tasks.recommendation.metrics import (
    KEY_EVAL_USERS,
    PUBLISHED_ANCHORS,
    aggregate_ranking,
    as_pooled,
    comparison_table,
    from_pooled,
    from_record,
    metric_keys,
    pool,
    pooled_keys,
    to_record,
)
from fedcrm.tasks.recommendation.settings import RecSettings
from fedcrm.tasks.recommendation.task import RecommendationTask


def test_pooled_branch_sums_equal_evaluating_everyone_at_once():
    log = synthetic_interactions(90, 160, seed=2, per_user=(3, 15))
    split = leave_one_out(log)
    negatives = sample_negatives(split, seed=1, n=50)
    table = np.random.default_rng(0).normal(size=(split.n_users, split.n_items))

    def score(users):
        return table[users]

    def local_scorer(global_users):
        return lambda local: table[global_users[local]]

    everyone = evaluate_scores(score, split, negatives)
    branches = np.array_split(np.random.default_rng(1).permutation(split.n_users), 4)
    parts = []
    for users in branches:
        users = users.astype(np.int64)
        local_split = split.restrict_users(users)
        local_negatives = negatives.restrict_users(users, split.n_users)
        parts.append(evaluate_scores(local_scorer(users), local_split, local_negatives))
    pooled = pool(parts)
    assert pooled.count == everyone.count == len(split.eval_users)
    for field in ("hr_sampled_sum", "ndcg_sampled_sum", "hr_full_sum", "ndcg_full_sum"):
        assert getattr(pooled, field) == pytest.approx(getattr(everyone, field), abs=1e-9)


def test_record_round_trip():
    metrics = RankingMetrics(10, 7, 5.0, 3.25, 1.0, 0.5)
    record = to_record(metrics)
    assert record[KEY_EVAL_USERS] == 7 and record["hr10-sampled-sum"] == 5.0
    assert set(record) == {KEY_EVAL_USERS, *metric_keys(10).values()}
    assert from_record(record) == metrics


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hr10-full-sum": None}, "lacks"),
        ({"hr10-sampled-sum": 8.0}, r"\[0, 7\]"),
        ({"ndcg10-full-sum": -1.0}, "must lie"),
    ],
    ids=["missing", "sum-above-count", "negative"],
)
def test_from_record_rejects_inconsistent_replies(change, message):
    record = to_record(RankingMetrics(10, 7, 5.0, 3.25, 1.0, 0.5))
    for key, value in change.items():
        if value is None:
            del record[key]
        else:
            record[key] = value
    with pytest.raises(InconsistentReplies, match=message):
        from_record(record)


def test_comparison_table_lists_ours_and_the_anchors():
    table = comparison_table({"mf": RankingMetrics(10, 4, 3.0, 2.0, 1.0, 0.5)})
    assert "0.750" in table and "ML-100K" in table
    for anchor in PUBLISHED_ANCHORS:
        assert anchor.name in table and anchor.data in table


def _reply(test: RankingMetrics, val: RankingMetrics) -> RecordDict:
    """A branch's evaluation reply: test sums, ``val-`` sums and its example count."""
    values: dict[str, int | float] = dict(to_record(test))
    values.update({k.REC_VAL_PREFIX + key: v for key, v in to_record(val).items()})
    values[k.KEY_NUM_EXAMPLES] = test.count
    return RecordDict({"metrics": MetricRecord(values)})  # type: ignore[arg-type]


PARTS = [
    (RankingMetrics(10, 7, 5.0, 3.25, 1.0, 0.5), RankingMetrics(10, 7, 4.0, 2.0, 1.0, 0.25)),
    (RankingMetrics(10, 3, 1.0, 0.5, 0.0, 0.0), RankingMetrics(10, 3, 2.0, 1.5, 1.0, 1.0)),
]


def test_aggregate_ranking_pools_test_and_validation_sums():
    pooled = aggregate_ranking([_reply(t, v) for t, v in PARTS], 10)
    test = pool([t for t, _ in PARTS])
    val = pool([v for _, v in PARTS])
    assert pooled["hr10-sampled"] == pytest.approx(6.0 / 10) == pytest.approx(test.hr_sampled)
    assert pooled["ndcg10-full"] == pytest.approx(test.ndcg_full)
    assert pooled["val-hr10-sampled"] == pytest.approx(val.hr_sampled)
    assert pooled["val-ndcg10-full"] == pytest.approx(1.25 / 10)
    assert pooled["users"] == pooled["val-users"] == 10
    assert pooled[k.KEY_NUM_EXAMPLES] == 10
    expected = {*pooled_keys(10).values(), "users"}
    assert set(pooled) == {*expected, *(k.REC_VAL_PREFIX + key for key in expected), "num-examples"}


def test_aggregate_ranking_refuses_a_malformed_reply():
    bad = _reply(*PARTS[0])
    del bad.metric_records["metrics"]["val-hr10-full-sum"]
    with pytest.raises(InconsistentReplies, match="lacks"):
        aggregate_ranking([_reply(*PARTS[1]), bad], 10)
    with pytest.raises(InconsistentReplies, match="lacks"):  # sums at another cut-off
        aggregate_ranking([_reply(*PARTS[1])], 5)


@pytest.mark.parametrize("prefix", ["", "val-"])
def test_pooled_values_round_trip(prefix):
    metrics = RankingMetrics(5, 8, 6.0, 2.5, 3.0, 1.25)
    values = as_pooled(metrics, prefix)
    assert set(values) == {prefix + key for key in (*pooled_keys(5).values(), "users")}
    assert values[prefix + "hr5-sampled"] == 0.75 and values[prefix + "users"] == 8
    back = from_pooled(values, 5, prefix)
    assert (back.k, back.count) == (5, 8)
    for field in ("hr_sampled_sum", "ndcg_sampled_sum", "hr_full_sum", "ndcg_full_sum"):
        assert getattr(back, field) == pytest.approx(getattr(metrics, field))


def test_top_5_runs_end_to_end_from_branch_evaluation_to_pooled_metrics(tmp_path: Path):
    """HR@5 / NDCG@5: the branch reports k=5 sums, the task pools them as ``hr5-sampled``."""
    task = RecommendationTask()
    settings = RecSettings(factors=8, top_k=5, num_items=140)
    arrays = task.initial_arrays(settings, seed=0)
    replies = []
    for seed in (1, 2):
        split = leave_one_out(synthetic_interactions(20, 140, seed=seed))
        data = RecBranch(tuple(f"p{u}" for u in range(20)), split, sample_negatives(split, seed=0))
        ctx = RoundContext(
            server_round=1, seed=seed, run_seed=0, config={}, state=RecordDict(), folder=tmp_path
        )
        values = task.evaluate(data, arrays, settings, ctx)
        assert "hr5-sampled-sum" in values and "val-ndcg5-full-sum" in values
        assert not any("10" in key for key in values)
        replies.append(RecordDict({"metrics": MetricRecord(values)}))  # type: ignore[arg-type]
    pooled = task.aggregate_evaluation(settings, replies, k.KEY_NUM_EXAMPLES)
    assert set(pooled_keys(5).values()) <= set(pooled)
    assert 0.0 <= pooled["ndcg5-sampled"] <= pooled["hr5-sampled"] <= 1.0
    assert pooled["users"] == 40 and pooled[k.KEY_NUM_EXAMPLES] == 40
    label, key = task.headline(settings)
    assert (label, key) == ("HR@5", "hr5-sampled") and key in pooled
    assert task.selection_metric(settings) == "val-hr5-sampled"
    assert "val-hr5-sampled" in pooled
