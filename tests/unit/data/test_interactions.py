"""Each user's history, by hand: the items before every event, and the latest items."""

import numpy as np
import pytest

from fedcrm.data.interactions import NO_ITEM, Interactions, latest_items, preceding_items
from fedcrm.exceptions import DataError


@pytest.fixture
def log() -> Interactions:
    # User 0 in time order: item 7 (t=1), item 5 (row 0, t=3), item 8 (row 3, t=3: the later
    # row of the same second is the later event); user 1: 6 (t=1), 9 (t=2); user 2: nothing.
    return Interactions.from_arrays(
        np.array([0, 1, 0, 0, 1]),
        np.array([5, 6, 7, 8, 9]),
        np.array([3, 1, 1, 3, 2]),
        n_users=3,
        n_items=10,
    )


def test_preceding_items_by_hand(log: Interactions) -> None:
    got = preceding_items(log, 2)
    expected = [[7, NO_ITEM], [NO_ITEM, NO_ITEM], [NO_ITEM, NO_ITEM], [5, 7], [6, NO_ITEM]]
    np.testing.assert_array_equal(got, expected)


def test_latest_items_by_hand(log: Interactions) -> None:
    np.testing.assert_array_equal(latest_items(log, 2), [[8, 5], [9, 6], [NO_ITEM, NO_ITEM]])
    np.testing.assert_array_equal(latest_items(log, 4)[0], [8, 5, 7, NO_ITEM])


def test_history_never_crosses_users_or_looks_ahead() -> None:
    rng = np.random.default_rng(0)
    log = Interactions.from_arrays(
        rng.integers(0, 6, 300),
        rng.integers(0, 40, 300),
        rng.integers(0, 50, 300),
        n_users=6,
        n_items=40,
    )
    got = preceding_items(log, 3)
    for j in range(len(log)):
        same = np.flatnonzero(log.user == log.user[j])
        earlier = [i for i in same if (log.timestamp[i], i) < (log.timestamp[j], j)]
        earlier.sort(key=lambda i: (log.timestamp[i], i), reverse=True)
        expected = [int(log.item[i]) for i in earlier[:3]]
        expected += [NO_ITEM] * (3 - len(expected))
        assert got[j].tolist() == expected


def test_zero_length_and_bad_length(log: Interactions) -> None:
    assert preceding_items(log, 0).shape == (len(log), 0)
    assert latest_items(log, 0).shape == (3, 0)
    with pytest.raises(DataError, match=">= 0"):
        preceding_items(log, -1)
    with pytest.raises(DataError, match=">= 0"):
        latest_items(log, -1)
