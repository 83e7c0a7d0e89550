"""Pooling branch ranking metrics is exact, and the record form round-trips."""

import numpy as np
import pytest

from fedcrm.data.interactions import synthetic_interactions
from fedcrm.data.movielens import leave_one_out, sample_negatives
from fedcrm.exceptions import InconsistentReplies
from fedcrm.models.rec_training import RankingMetrics, evaluate_scores
from fedcrm.simulation.rec_metrics import (
    KEY_EVAL_USERS,
    PUBLISHED_ANCHORS,
    comparison_table,
    from_record,
    metric_keys,
    pool,
    to_record,
)


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
