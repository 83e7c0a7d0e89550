"""The recommender keeps user factors out of its shared state."""

import io

import numpy as np
import pytest
import torch

from fedcrm.data.interactions import NO_ITEM
from fedcrm.exceptions import ConfigError
from fedcrm.models.recommender import (
    LOCAL_PREFIX,
    SHARED_PREFIX,
    MatrixFactorisation,
    context_length_of,
    load_local_state,
    load_shared_state,
    local_state,
    shared_state,
)

N_ITEMS, FACTORS = 50, 8


pytestmark = pytest.mark.usefixtures("one_thread")


def serialised_size(arrays: dict[str, np.ndarray]) -> int:
    buffer = io.BytesIO()
    np.savez(buffer, *arrays.values())
    return buffer.getbuffer().nbytes


def test_shared_state_holds_only_item_parameters():
    model = MatrixFactorisation(30, N_ITEMS, FACTORS, seed=0)
    state = shared_state(model)
    assert sorted(state) == ["items.bias.weight", "items.embedding.weight"]
    assert all(key.startswith(SHARED_PREFIX) and "user" not in key for key in state)
    assert state["items.embedding.weight"].shape == (N_ITEMS, FACTORS)
    assert state["items.bias.weight"].shape == (N_ITEMS, 1)
    user_table = model.users.embedding.weight.detach().numpy()
    for array in state.values():
        assert array.shape[0] != user_table.shape[0]
        assert not np.isin(user_table.ravel(), array.ravel()).any()


@pytest.mark.parametrize("n_users", [1, 30, 5_000], ids=["one-user", "small", "large"])
def test_shared_state_size_does_not_depend_on_users(n_users):
    model = MatrixFactorisation(n_users, N_ITEMS, FACTORS, seed=0)
    size = serialised_size(shared_state(model))
    user_table_bytes = n_users * FACTORS * 4
    item_bytes = N_ITEMS * (FACTORS + 1) * 4
    assert item_bytes <= size < item_bytes + 1_024  # the item part plus npz headers only
    assert size == serialised_size(shared_state(MatrixFactorisation(7, N_ITEMS, FACTORS, seed=0)))
    if n_users == 5_000:
        assert size < user_table_bytes  # the large user table would dominate were it included


def test_item_initialisation_is_shared_across_branches_of_any_size():
    small = MatrixFactorisation(3, N_ITEMS, FACTORS, seed=11)
    large = MatrixFactorisation(300, N_ITEMS, FACTORS, seed=11)
    for key, array in shared_state(small).items():
        np.testing.assert_array_equal(array, shared_state(large)[key])


def test_load_shared_state_replaces_items_and_keeps_users():
    source = MatrixFactorisation(10, N_ITEMS, FACTORS, seed=1)
    target = MatrixFactorisation(20, N_ITEMS, FACTORS, seed=2)
    users_before = target.users.embedding.weight.detach().clone()
    load_shared_state(target, shared_state(source))
    for key, array in shared_state(source).items():
        np.testing.assert_array_equal(shared_state(target)[key], array)
    assert torch.equal(target.users.embedding.weight, users_before)


def test_shared_state_is_a_copy():
    model = MatrixFactorisation(4, N_ITEMS, FACTORS, seed=0)
    state = shared_state(model)
    state["items.embedding.weight"][:] = 42.0
    assert not torch.any(model.items.embedding.weight == 42.0)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.pop("items.bias.weight"), "missing"),
        (
            lambda s: s.update({"users.embedding.weight": np.zeros((4, FACTORS), np.float32)}),
            "unexpected",
        ),
        (
            lambda s: s.update({"items.bias.weight": np.zeros((N_ITEMS + 1, 1), np.float32)}),
            "shape",
        ),
        (
            lambda s: s.update({"items.bias.weight": np.full((N_ITEMS, 1), np.nan, np.float32)}),
            "non-finite",
        ),
    ],
    ids=["missing-key", "user-key-smuggled-in", "wrong-shape", "nan"],
)
def test_load_shared_state_rejects_mismatches(mutate, message):
    model = MatrixFactorisation(4, N_ITEMS, FACTORS, seed=0)
    state = shared_state(model)
    mutate(state)
    before = shared_state(model)
    with pytest.raises(ConfigError, match=message):
        load_shared_state(model, state)
    for key, array in shared_state(model).items():
        np.testing.assert_array_equal(array, before[key])


def test_local_state_round_trip_keeps_users_on_the_branch():
    model = MatrixFactorisation(6, N_ITEMS, FACTORS, seed=0)
    saved = local_state(model)
    assert list(saved) == ["users.embedding.weight"]
    assert all(key.startswith(LOCAL_PREFIX) for key in saved)
    fresh = MatrixFactorisation(6, N_ITEMS, FACTORS, seed=5)
    load_local_state(fresh, saved)
    assert torch.equal(fresh.users.embedding.weight, model.users.embedding.weight)
    with pytest.raises(ConfigError, match="shape"):
        load_local_state(MatrixFactorisation(7, N_ITEMS, FACTORS), saved)


def test_scores_match_the_factorisation():
    model = MatrixFactorisation(3, N_ITEMS, FACTORS, seed=0)
    with torch.no_grad():
        model.items.bias.weight.normal_()
        users = torch.tensor([0, 2])
        all_scores = model.score_all(users)
        pairs = model(torch.tensor([0, 2]), torch.tensor([5, 49]))
        p = model.users.embedding.weight
        q = model.items.embedding.weight
        b = model.items.bias.weight[:, 0]
    assert all_scores.shape == (2, N_ITEMS)
    torch.testing.assert_close(pairs, torch.stack([all_scores[0, 5], all_scores[1, 49]]))
    torch.testing.assert_close(all_scores[1, 7], p[2] @ q[7] + b[7])


def test_invalid_sizes():
    with pytest.raises(ConfigError, match=">= 1"):
        MatrixFactorisation(0, N_ITEMS)


def test_history_model_scores_by_hand():
    model = MatrixFactorisation(3, N_ITEMS, FACTORS, context=2, seed=0)
    with torch.no_grad():
        model.items.position.weight.copy_(torch.tensor([[0.7], [0.2]]))
        model.items.bias.weight.normal_()
    recent = torch.tensor([[4, 9], [3, NO_ITEM]])
    users = torch.tensor([0, 2])
    with torch.no_grad():
        scores = model.score_all(users, recent)
        pairs = model(users, torch.tensor([5, 49]), recent)
        p = model.users.embedding.weight
        q = model.items.embedding.weight
        y = model.items.context.weight
        b = model.items.bias.weight[:, 0]
    torch.testing.assert_close(scores[0, 5], (p[0] + 0.7 * y[4] + 0.2 * y[9]) @ q[5] + b[5])
    torch.testing.assert_close(scores[1, 49], (p[2] + 0.7 * y[3]) @ q[49] + b[49])  # empty slot
    torch.testing.assert_close(pairs, torch.stack([scores[0, 5], scores[1, 49]]))


def test_history_parameters_are_shared_and_users_stay_local():
    model = MatrixFactorisation(30, N_ITEMS, FACTORS, context=3, seed=0)
    shared = shared_state(model)
    assert set(shared) == {
        "items.embedding.weight",
        "items.bias.weight",
        "items.context.weight",
        "items.position.weight",
    }
    assert context_length_of(shared) == 3
    assert context_length_of(shared_state(MatrixFactorisation(3, N_ITEMS, FACTORS))) == 0
    # Same shared start on every branch, whatever its users.
    other = shared_state(MatrixFactorisation(7, N_ITEMS, FACTORS, context=3, seed=0))
    for key, array in shared.items():
        np.testing.assert_array_equal(array, other[key])
    assert set(local_state(model)) == {"users.embedding.weight"}


def test_history_must_match_the_model():
    plain = MatrixFactorisation(3, N_ITEMS, FACTORS)
    with_history = MatrixFactorisation(3, N_ITEMS, FACTORS, context=2)
    users = torch.tensor([0])
    with pytest.raises(ConfigError, match="recent items"):
        with_history.score_all(users)
    with pytest.raises(ConfigError, match="recent items"):
        plain.score_all(users, torch.tensor([[1, 2]]))
    with pytest.raises(ConfigError, match="needs 2"):
        with_history.score_all(users, torch.tensor([[1, 2, 3]]))
    with pytest.raises(ConfigError, match="context >= 0"):
        MatrixFactorisation(3, N_ITEMS, FACTORS, context=-1)
