"""Ranking metrics against hand-computed values, and local training on structured synthetic data."""

import math

import numpy as np
import pytest
import torch

from fedcrm.data.interactions import Interactions, synthetic_interactions
from fedcrm.data.movielens import (
    LeaveOneOutSplit,
    SampledNegatives,
    leave_one_out,
    sample_negatives,
)
from fedcrm.exceptions import ConfigError, DataError
from fedcrm.models.rec_training import (
    RankingMetrics,
    ScoreFn,
    evaluate_branch,
    evaluate_scores,
    hit_ratio,
    ndcg,
    recency_weights,
    sample_training_negatives,
    target_ranks,
    top_n,
    train_branch,
)
from fedcrm.models.recommender import MatrixFactorisation, shared_state

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ranks_hr_ndcg_by_hand():
    target = np.array([0.9, 0.5, 0.3])
    candidates = np.array(
        [
            [0.1, 0.2, 0.3, 0.4],  # nothing beats 0.9 -> rank 0
            [0.9, 0.1, 0.6, 0.2],  # 0.9 and 0.6 beat 0.5 -> rank 2
            [0.3, 0.1, 0.0, 0.2],  # a tie counts against the target -> rank 1
        ]
    )
    ranks = target_ranks(target, candidates)
    assert ranks.tolist() == [0, 2, 1]
    assert hit_ratio(ranks, k=2).tolist() == [1.0, 0.0, 1.0]
    np.testing.assert_allclose(ndcg(ranks, k=2), [1.0, 0.0, 1 / math.log2(3)])
    np.testing.assert_allclose(ndcg(ranks, k=3), [1.0, 0.5, 1 / math.log2(3)])
    excluded = np.zeros_like(candidates, dtype=bool)
    excluded[1, 0] = True  # drop the 0.9 competitor of user 1
    assert target_ranks(target, candidates, excluded).tolist() == [0, 1, 1]


def test_constant_scorer_gets_no_credit():
    ranks = target_ranks(np.zeros(4), np.zeros((4, 99)))
    assert hit_ratio(ranks, k=10).sum() == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_scores_are_rejected(bad):
    with pytest.raises(DataError, match="finite"):
        target_ranks(np.array([bad]), np.zeros((1, 3)))


def tiny_split() -> tuple[LeaveOneOutSplit, SampledNegatives, ScoreFn]:
    # user 0: items 0, 1, 2 in time order -> train {0}, val 1, test 2
    # user 1: items 3, 4, 5, 0 in time order -> train {3, 4}, val 5, test 0
    log = Interactions.from_arrays(
        np.array([0, 0, 0, 1, 1, 1, 1]),
        np.array([0, 1, 2, 3, 4, 5, 0]),
        np.array([1, 2, 3, 1, 2, 3, 4]),
        n_users=2,
        n_items=8,
    )
    split = leave_one_out(log)
    negatives = SampledNegatives(users=np.array([0, 1]), items=np.array([[3, 4], [2, 6]]), seed=0)
    scores = np.array(
        [
            [5, 4, 3, 6, 1, 2, 0, 0],
            [3, 9, 0, 8, 7, 1, 2, 4],
        ],
        dtype=np.float64,
    )
    return split, negatives, lambda users: scores[users]


def test_evaluate_scores_by_hand():
    split, negatives, score = tiny_split()
    assert split.test_items.tolist() == [2, 0] and split.val_items.tolist() == [1, 5]
    got = evaluate_scores(score, split, negatives, k=2)
    # user 0, target 2 (score 3): sampled {3: 6, 4: 1} -> rank 1; full candidates
    #   {3, 4, 5, 6, 7} (train 0, val 1 excluded) -> only 6 beats it -> rank 1.
    # user 1, target 0 (score 3): sampled {2: 0, 6: 2} -> rank 0; full candidates {1, 2, 6, 7}
    #   (train 3, 4 and val 5 excluded, though 8 and 7 would beat it) -> 9, 4 beat it -> rank 2.
    expected = RankingMetrics(
        k=2,
        count=2,
        hr_sampled_sum=2.0,
        ndcg_sampled_sum=1 / math.log2(3) + 1.0,
        hr_full_sum=1.0,
        ndcg_full_sum=1 / math.log2(3),
    )
    assert got.count == expected.count
    for field in ("hr_sampled_sum", "ndcg_sampled_sum", "hr_full_sum", "ndcg_full_sum"):
        assert getattr(got, field) == pytest.approx(getattr(expected, field))
    assert got.hr_sampled == 1.0 and got.hr_full == 0.5
    # Validation target (the test item competes, training items do not):
    # user 0, target 1 (score 4): sampled {3: 6, 4: 1} -> rank 1; full {2, 3, 4, 5, 6, 7} -> rank 1.
    # user 1, target 5 (score 1): sampled {2: 0, 6: 2} -> rank 1; full {0, 1, 2, 6, 7} scores
    #   3, 9, 0, 2, 4 -> rank 4 (the test item 0 is among those that beat it).
    val = evaluate_scores(score, split, negatives, target="val", k=2)
    assert (val.hr_sampled_sum, val.hr_full_sum) == (2.0, 1.0)
    assert val.ndcg_full_sum == pytest.approx(1 / math.log2(3))
    # Batching does not change the result.
    assert evaluate_scores(score, split, negatives, k=2, batch_size=1) == got


def test_evaluate_rejects_misaligned_negatives():
    split, negatives, score = tiny_split()
    other = SampledNegatives(users=np.array([1, 0]), items=negatives.items, seed=0)
    with pytest.raises(DataError, match="aligned"):
        evaluate_scores(score, split, other)


def test_ranking_metrics_add_exactly():
    a = RankingMetrics(10, 3, 2.0, 1.5, 1.0, 0.5)
    b = RankingMetrics(10, 1, 1.0, 1.0, 0.0, 0.0)
    total = a + b
    assert total.count == 4 and total.hr_sampled == 0.75 and total.ndcg_full == 0.125
    assert math.isnan(RankingMetrics.empty().hr_sampled)
    with pytest.raises(DataError, match="k=10"):
        a + RankingMetrics.empty(k=5)


@pytest.fixture(scope="module")
def structured():
    log = synthetic_interactions(150, 200, seed=1, n_groups=4, per_user=(10, 25), affinity=0.9)
    split = leave_one_out(log)
    return split, sample_negatives(split, seed=0, n=99)


@pytest.mark.parametrize("loss", ["bce", "bpr"])
def test_training_lowers_loss_and_beats_random(structured, loss):
    split, negatives = structured
    model = MatrixFactorisation(split.n_users, split.n_items, 16, seed=0)
    before = evaluate_branch(model, split, negatives)
    result = train_branch(
        model,
        split.train,
        epochs=6,
        lr=0.03,
        negatives_per_positive=4,
        seed=0,
        weight_decay=1e-4,
        batch_size=1024,
        loss=loss,
    )
    after = evaluate_branch(model, split, negatives)
    assert result.num_examples == len(split.train)
    assert result.epoch_losses[-1] < 0.8 * result.epoch_losses[0]
    random_hr = 10 / 100
    assert after.hr_sampled > 2.5 * random_hr
    assert after.hr_sampled > before.hr_sampled
    assert 0 < after.ndcg_sampled <= after.hr_sampled


def test_training_is_deterministic_for_a_seed(structured):
    split, _ = structured
    states = []
    for _ in range(2):
        model = MatrixFactorisation(split.n_users, split.n_items, 8, seed=3)
        train_branch(model, split.train, epochs=2, lr=0.01, negatives_per_positive=2, seed=9)
        states.append(shared_state(model))
    for key, array in states[0].items():
        np.testing.assert_array_equal(array, states[1][key])


def test_training_negatives_are_never_positives(structured):
    split, _ = structured
    drawn = sample_training_negatives(split.train, 5, np.random.default_rng(0))
    assert drawn.shape == (len(split.train), 5)
    positives = set(split.train.keys().tolist())
    keys = (np.repeat(split.train.user, 5) * split.n_items + drawn.ravel()).tolist()
    assert positives.isdisjoint(keys)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"lr": 0.0},
        {"lr": math.nan},
        {"negatives_per_positive": 0},
        {"weight_decay": -1.0},
        {"loss": "mse"},
        {"batch_size": 0},
    ],
    ids=["epochs", "lr-zero", "lr-nan", "negatives", "weight-decay", "loss", "batch"],
)
def test_train_branch_validates_settings(structured, kwargs):
    split, _ = structured
    model = MatrixFactorisation(split.n_users, split.n_items, 4)
    settings = {"epochs": 1, "lr": 0.01, "negatives_per_positive": 1, "seed": 0} | kwargs
    with pytest.raises(ConfigError):
        train_branch(model, split.train, **settings)


def test_model_must_match_the_data(structured):
    split, negatives = structured
    model = MatrixFactorisation(split.n_users + 1, split.n_items, 4)
    with pytest.raises(ConfigError, match="sized for"):
        train_branch(model, split.train, epochs=1, lr=0.01, negatives_per_positive=1, seed=0)
    with pytest.raises(ConfigError, match="sized for"):
        evaluate_branch(model, split, negatives)


def test_empty_branch_trains_to_nothing():
    empty = Interactions.from_arrays(np.array([]), np.array([]), np.array([]), n_users=2, n_items=5)
    model = MatrixFactorisation(2, 5, 4)
    before = model.users.embedding.weight.detach().clone()
    result = train_branch(model, empty, epochs=1, lr=0.01, negatives_per_positive=1, seed=0)
    assert result.num_examples == 0 and result.epoch_losses == ()
    assert torch.equal(model.users.embedding.weight, before)


def test_top_n_skips_seen_items_and_breaks_ties_by_index():
    scores = np.array([0.5, 0.9, 0.1, 0.9, 0.7])
    items, values = top_n(scores, exclude=np.array([3]), n=3)
    assert items.tolist() == [1, 4, 0] and values.tolist() == [0.9, 0.7, 0.5]
    items, _ = top_n(scores, exclude=np.array([], dtype=np.int64), n=2)
    assert items.tolist() == [1, 3]  # equal scores: smaller index first
    assert len(top_n(scores, exclude=np.arange(4), n=10)[0]) == 1
    with pytest.raises(ConfigError):
        top_n(scores, exclude=np.array([0]), n=0)
    with pytest.raises(DataError, match="finite"):
        top_n(np.array([np.nan, 1.0]), exclude=np.array([0]), n=1)


def test_recency_weights_halve_per_later_event_by_hand():
    # User 1: rows 3 (t=2), 0 (t=5), 2 (t=5, later row); user 0: rows 4 (t=0), 1 (t=1).
    log = Interactions.from_arrays(
        np.array([1, 0, 1, 1, 0]),
        np.array([0, 1, 2, 3, 4]),
        np.array([5, 1, 5, 2, 0]),
        n_users=3,
        n_items=5,
    )
    raw = np.array([0.5, 1.0, 1.0, 0.25, 0.5])
    np.testing.assert_allclose(recency_weights(log, 1.0), raw / raw.mean())
    np.testing.assert_array_equal(recency_weights(log, 0.0), np.ones(5))
    with pytest.raises(ConfigError):
        recency_weights(log, -1.0)


def _markov_log(n_users: int = 120, n_items: int = 150, length: int = 12) -> Interactions:
    """Each user walks a fixed successor chain over the items (90 %), so the next item is
    predictable from the previous one but not from the set of items a user has seen."""
    rng = np.random.default_rng(0)
    successor = rng.permutation(n_items)
    users, items, times = [], [], []
    for user in range(n_users):
        item, seen = int(rng.integers(n_items)), set()
        for t in range(length):
            while item in seen:
                item = int(rng.integers(n_items))
            seen.add(item)
            users.append(user)
            items.append(item)
            times.append(t)
            item = int(successor[item]) if rng.random() < 0.9 else int(rng.integers(n_items))
    return Interactions.from_arrays(
        np.array(users), np.array(items), np.array(times), n_users=n_users, n_items=n_items
    )


def test_history_model_learns_the_next_item_where_mf_cannot():
    split = leave_one_out(_markov_log())
    negatives = sample_negatives(split, seed=0, n=99)
    hr = {}
    for history in (0, 2):
        model = MatrixFactorisation(split.n_users, split.n_items, 16, context=history, seed=0)
        train_branch(
            model, split.train, epochs=8, lr=0.03, negatives_per_positive=4, seed=0, batch_size=512
        )
        hr[history] = evaluate_branch(model, split, negatives).hr_sampled
    assert hr[2] > 0.7, hr
    assert hr[2] > hr[0] + 0.2, hr
