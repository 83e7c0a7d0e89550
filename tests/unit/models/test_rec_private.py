"""Customer-level DP-SGD pieces: one row per customer, padding ignored, only items trained."""

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from fedcrm import wire as k
from fedcrm.client.dp_round import BranchPrivacy, private_round
from fedcrm.data.interactions import NO_ITEM, Interactions, synthetic_interactions
from fedcrm.data.movielens import leave_one_out, sample_negatives
from fedcrm.models.rec_private import (
    PADDING,
    ItemScorer,
    MaskedBCEWithLogits,
    fit_user_factors,
    train_items_private,
    user_rows,
)
from fedcrm.models.recommender import MatrixFactorisation
from fedcrm.privacy import DPSGDConfig
from fedcrm.tasks import RoundContext
from fedcrm.tasks.recommendation.data import RecBranch
from fedcrm.tasks.recommendation.settings import RecSettings
from fedcrm.tasks.recommendation.task import RecommendationTask

pytestmark = [
    pytest.mark.filterwarnings("ignore::fedcrm.privacy.InsecureRNGWarning"),
    pytest.mark.usefixtures("one_thread"),
]


def test_user_rows_keep_each_customers_latest_events_with_their_negatives() -> None:
    # Customer 0: items 5 (t=1), 6 (t=3), 7 (t=2); customer 2: item 9; customer 1: nothing.
    log = Interactions.from_arrays(
        np.array([0, 0, 0, 2]),
        np.array([5, 6, 7, 9]),
        np.array([1, 3, 2, 0]),
        n_users=3,
        n_items=30,
    )
    rows = user_rows(log, cap=2, negatives_per_positive=3, rng=np.random.default_rng(0))
    assert rows.users.tolist() == [0, 2]  # the customer without events has no row
    assert rows.items.shape == rows.targets.shape == (2, 2 * 4)
    positives = rows.items[0][rows.targets[0] == 1].tolist()
    assert sorted(positives) == [6, 7]  # the latest two; item 5 (t=1) is capped away
    assert (rows.targets[0] == 0).sum() == 6
    negatives = rows.items[0][rows.targets[0] == 0].tolist()
    assert not set(negatives) & {5, 6, 7}
    assert (rows.targets[1] == 1).sum() == 1
    assert (rows.targets[1] == PADDING).sum() == 4


def test_masked_bce_ignores_padding() -> None:
    logits = torch.tensor([[2.0, -1.0, 5.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, PADDING]])
    loss = MaskedBCEWithLogits(reduction="none")(logits, targets)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, :2], targets[:, :2], reduction="none"
    )
    torch.testing.assert_close(loss[:, :2], expected * 3)  # x width: the row mean is the sum
    assert loss[0, 2] == 0
    loss.sum().backward()
    assert logits.grad is not None and logits.grad[0, 2] == 0


def test_private_step_trains_items_only_and_counts_its_steps() -> None:
    log = synthetic_interactions(30, 140, seed=2)
    model = MatrixFactorisation(30, 140, 8, seed=0)
    users_before = model.users.embedding.weight.detach().clone()
    items_before = model.items.embedding.weight.detach().clone()
    rows = user_rows(log, cap=10, negatives_per_positive=2, rng=np.random.default_rng(1))
    _, event = train_items_private(
        model,
        rows,
        lr=0.5,
        batch_size=10,
        epochs=1,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        max_steps=3,
        seed=0,
    )
    assert event is not None and event.steps == 3 and event.sample_rate == pytest.approx(1 / 3)
    torch.testing.assert_close(model.users.embedding.weight, users_before)
    assert not torch.equal(model.items.embedding.weight, items_before)
    assert all(p.requires_grad for p in model.parameters())


def test_user_factor_fit_leaves_the_item_tower_alone() -> None:
    log = synthetic_interactions(30, 140, seed=2)
    model = MatrixFactorisation(30, 140, 8, seed=0)
    items_before = model.items.embedding.weight.detach().clone()
    users_before = model.users.embedding.weight.detach().clone()
    fit_user_factors(
        model,
        log,
        epochs=1,
        lr=0.01,
        negatives_per_positive=2,
        seed=0,
        weight_decay=0.0,
        batch_size=64,
        loss="bce",
        recency_halflife=0.0,
    )
    torch.testing.assert_close(model.items.embedding.weight, items_before)
    assert not torch.equal(model.users.embedding.weight, users_before)


def _rec_branch(users: int = 30, items: int = 140) -> RecBranch:
    split = leave_one_out(synthetic_interactions(users, items, seed=3))
    customers = tuple(f"p{u}" for u in range(users))
    return RecBranch(customers, split, sample_negatives(split, seed=0))


def test_customer_round_past_the_budget_is_refused_and_trains_nothing(tmp_path: Path) -> None:
    """The task's customer-level round through the core's DP round (`private_round`)."""
    task = RecommendationTask()
    data = _rec_branch()
    dp = DPSGDConfig(
        target_epsilon=2.0, delta=1e-5, grad_sample_mode="hooks", model="rec", purpose="p"
    )
    settings = RecSettings(
        local_epochs=1,
        lr=0.01,
        factors=8,
        negatives_per_positive=2,
        weight_decay=0.0,
        batch_size=64,
        users_per_step=100,  # above the 30 customers: full batches
        max_interactions_per_user=10,
        num_items=140,
    )
    rows = task.private_rows(data, settings)
    assert (rows.rows, rows.batch_size, rows.unit) == (30, 30, "customer")
    arrays = task.initial_arrays(settings, seed=0)
    ctx = RoundContext(
        server_round=1, seed=0, run_seed=0, config={}, state=RecordDict(), folder=tmp_path
    )
    where = BranchPrivacy(privacy_dir=tmp_path / "privacy", branch_name="north")
    first = private_round(
        task, data, arrays, settings, ctx, dp=dp, rounds=1, where=where, run_id="r"
    )
    assert first.update is not None and first.report.decision == "admitted"
    assert first.report.privacy_unit == "customer"
    assert first.report.sample_rate == 1.0
    assert 0 < first.report.epsilon <= 2.0
    assert first.update.num_examples == 30  # one DP-SGD row per customer
    assert first.update.event is not None and first.update.event.steps == first.report.steps
    # Only the item tower travels: the user factors stay in the node's state.
    assert set(first.update.arrays) == set(arrays)
    assert any(not np.array_equal(first.update.arrays[n], arrays[n]) for n in arrays)
    users = {
        n: a.numpy().copy() for n, a in ctx.state.array_records[k.STATE_REC_USER_FACTORS].items()
    }
    saved = (tmp_path / k.REC_USER_FACTORS_FILE).read_bytes()

    second = private_round(
        task, data, first.update.arrays, settings, ctx, dp=dp, rounds=1, where=where, run_id="r"
    )
    assert second.update is None and second.report.decision == "refused"
    assert second.report.epsilon == first.report.epsilon  # nothing spent
    assert second.report.steps == 0
    after = ctx.state.array_records[k.STATE_REC_USER_FACTORS]
    for name, values in users.items():
        np.testing.assert_array_equal(after[name].numpy(), values)  # nothing trained
    assert (tmp_path / k.REC_USER_FACTORS_FILE).read_bytes() == saved


def test_history_rows_carry_each_events_earlier_items() -> None:
    # Customer 0 in time order: items 5, 7, 6; the row keeps the latest two events (7 and 6).
    log = Interactions.from_arrays(
        np.array([0, 0, 0]), np.array([5, 6, 7]), np.array([1, 3, 2]), n_users=1, n_items=30
    )
    rows = user_rows(log, cap=2, negatives_per_positive=1, rng=np.random.default_rng(0), history=2)
    assert rows.recent is not None and rows.recent.shape == (1, 4, 2)
    by_positive = {
        int(rows.items[0, s]): rows.recent[0, s].tolist()
        for s in range(4)
        if rows.targets[0, s] == 1
    }
    assert by_positive == {7: [5, NO_ITEM], 6: [7, 5]}  # item 5 is capped away but is history
    # A negative shares its positive's history.
    assert rows.recent[0, 1].tolist() == rows.recent[0, 0].tolist()


def test_private_scorer_matches_the_history_model_and_trains_under_opacus() -> None:
    log = synthetic_interactions(30, 140, seed=2)
    model = MatrixFactorisation(30, 140, 8, context=3, seed=0)
    rows = user_rows(log, cap=10, negatives_per_positive=2, rng=np.random.default_rng(1), history=3)
    assert rows.recent is not None
    with torch.no_grad():
        factors = model.users.embedding.weight[rows.users]
        features = torch.cat(
            [factors, rows.items.float(), rows.recent.reshape(len(rows), -1).float()], dim=1
        )
        packed = ItemScorer(model.items, model.factors)(features)
        expected = model(
            rows.users.repeat_interleave(rows.items.shape[1]),
            rows.items.reshape(-1),
            rows.recent.reshape(-1, 3),
        ).reshape(packed.shape)
    torch.testing.assert_close(packed, expected)
    context_before = model.items.context.weight.detach().clone()
    _, event = train_items_private(
        model,
        rows,
        lr=0.5,
        batch_size=10,
        epochs=1,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        max_steps=3,
        seed=0,
    )
    assert event is not None and event.steps == 3
    assert not torch.equal(model.items.context.weight, context_before)
