"""Customer-level DP-SGD pieces: one row per customer, padding ignored, only items trained."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcrm.client.rec_dp_round import RecDPRound, private_rec_round
from fedcrm.data.interactions import NO_ITEM, Interactions, synthetic_interactions
from fedcrm.models.rec_private import (
    PADDING,
    ItemScorer,
    MaskedBCEWithLogits,
    fit_user_factors,
    train_items_private,
    user_rows,
)
from fedcrm.models.recommender import MatrixFactorisation
from fedcrm.privacy.federated import FederatedDPConfig

pytestmark = pytest.mark.filterwarnings("ignore::fedcrm.privacy.dp_sgd.InsecureRNGWarning")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    torch.set_num_threads(1)
    yield


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


def test_round_past_the_budget_is_refused_and_trains_nothing(tmp_path: Path) -> None:
    log = synthetic_interactions(30, 140, seed=3)
    model = MatrixFactorisation(30, 140, 8, seed=0)
    dp = FederatedDPConfig(
        target_epsilon=2.0, delta=1e-5, grad_sample_mode="hooks", model="rec", purpose="p"
    )
    settings = RecDPRound(
        epochs=1,
        lr=0.01,
        negatives_per_positive=2,
        weight_decay=0.0,
        batch_size=64,
        loss="bce",
        recency_halflife=0.0,
        users_per_step=100,  # above the 30 customers: full batches
        cap=10,
        rounds=1,
        seed=0,
        noise_seed=0,
    )
    first = private_rec_round(
        model, log, settings, dp=dp, privacy_dir=tmp_path, branch_name="north"
    )
    assert first.trained and first.report.privacy_unit == "customer"
    assert first.report.sample_rate == 1.0
    assert 0 < first.report.epsilon <= 2.0
    state = {name: t.clone() for name, t in model.state_dict().items()}
    second = private_rec_round(
        model, log, settings, dp=dp, privacy_dir=tmp_path, branch_name="north"
    )
    assert not second.trained and second.report.decision == "refused"
    assert second.report.epsilon == first.report.epsilon  # nothing spent
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state[name])


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
