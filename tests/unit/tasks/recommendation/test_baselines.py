"""Centralised baselines: popularity, item-kNN and MF on the same split."""

import numpy as np
import pytest

from fedcrm.data.interactions import Interactions, synthetic_interactions
from fedcrm.data.movielens import leave_one_out, sample_negatives
from fedcrm.exceptions import ConfigError
from fedcrm.models.rec_training import MFSettings
from fedcrm.tasks.recommendation.baselines import (
    HISTORY_MF,
    centralised_baselines,
    item_knn_scorer,
    popularity_scorer,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    # 3 users x 4 items: u0 {0, 1}, u1 {0, 1, 2}, u2 {2, 3}
    return Interactions.from_arrays(
        np.array([0, 0, 1, 1, 1, 2, 2]),
        np.array([0, 1, 0, 1, 2, 2, 3]),
        np.zeros(7),
        n_users=3,
        n_items=4,
    )


def test_popularity_scores_are_training_counts(tiny):
    scores = popularity_scorer(tiny)(np.array([0, 2]))
    assert scores.tolist() == [[2, 2, 2, 1], [2, 2, 2, 1]]


def test_item_knn_by_hand(tiny):
    # columns: i0 = {u0, u1}, i1 = {u0, u1}, i2 = {u1, u2}, i3 = {u2}
    # cos(0,1) = 1, cos(0,2) = cos(1,2) = 1/2, cos(2,3) = 1/sqrt(2), cos(0,3) = cos(1,3) = 0
    scores = item_knn_scorer(tiny)(np.array([0, 2]))
    s = 1 / np.sqrt(2)
    np.testing.assert_allclose(scores[0], [1.0, 1.0, 1.0, 0.0])  # u0 holds items 0 and 1
    np.testing.assert_allclose(scores[1], [0.5, 0.5, s, s])  # u2 holds items 2 and 3
    top1 = item_knn_scorer(tiny, neighbours=1)(np.array([2]))
    # item 2's single nearest neighbour is item 3; items 0/1 keep each other; item 3 keeps 2
    np.testing.assert_allclose(top1[0], [0.0, 0.0, s, s])
    with pytest.raises(ConfigError):
        item_knn_scorer(tiny, neighbours=0)


def test_centralised_baselines_on_structured_data():
    log = synthetic_interactions(150, 200, seed=1, per_user=(10, 25), affinity=0.9)
    split = leave_one_out(log)
    negatives = sample_negatives(split, seed=0)
    mf = MFSettings(factors=16, epochs=6, lr=0.03, batch_size=1024, weight_decay=1e-4)
    results = centralised_baselines(split, negatives, seed=0, mf=mf, knn_neighbours=50)
    assert list(results) == ["popularity", "item-knn", "mf"]
    for metrics in results.values():
        assert metrics.count == len(split.eval_users)
        assert 0.0 <= metrics.ndcg_sampled <= metrics.hr_sampled <= 1.0
        assert metrics.hr_full <= metrics.hr_sampled
    # Taste groups are invisible to popularity; personalised models find them.
    assert results["item-knn"].hr_sampled > results["popularity"].hr_sampled
    assert results["mf"].hr_sampled > results["popularity"].hr_sampled


def test_history_settings_add_the_history_model_beside_plain_mf():
    log = synthetic_interactions(60, 150, seed=1, per_user=(8, 12))
    split = leave_one_out(log)
    mf = MFSettings(factors=8, epochs=2, lr=0.03, batch_size=1024, history_length=2)
    results = centralised_baselines(split, sample_negatives(split, seed=0), seed=0, mf=mf)
    assert list(results) == ["popularity", "item-knn", "mf", HISTORY_MF]
    assert results["mf"].hr_sampled != results[HISTORY_MF].hr_sampled


@pytest.mark.parametrize(
    "kwargs",
    [
        {"factors": 0},
        {"eval_every": 0},
        {"lr": -1.0},
        {"loss": "hinge"},
        {"weight_decay": -0.1},
        {"history_length": -1},
    ],
    ids=["factors", "eval-every", "lr", "loss", "weight-decay", "history"],
)
def test_mf_settings_validate(kwargs):
    with pytest.raises(ConfigError):
        MFSettings(**kwargs)
