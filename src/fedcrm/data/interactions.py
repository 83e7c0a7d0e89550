"""Implicit-feedback interaction logs and a synthetic generator with learnable structure.

An `Interactions` log holds dense user and item indices with a timestamp per event. Users are
indexed ``0..n_users-1`` and items ``0..n_items-1``; the item index space is the shared
catalogue every branch agrees on, the user index space is whatever the holder of the log uses
(global in a pooled run, branch-local inside a branch).

`synthetic_interactions` makes small data sets for tests and demos: users belong to latent
taste groups that prefer their own group of items, so a recommender that learns anything beats
random ranking. It never touches a real data set.
"""

from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from fedcrm.exceptions import DataError

IntArray = NDArray[np.int64]
"""A one-dimensional array of 64-bit integer indices."""


@dataclass(frozen=True)
class Interactions:
    """An implicit-feedback log: ``user[j]`` interacted with ``item[j]`` at ``timestamp[j]``.

    Attributes:
        user: Dense user index of each event, in ``[0, n_users)``.
        item: Dense item index of each event, in ``[0, n_items)``.
        timestamp: Event time (seconds since the epoch for MovieLens; any ordered integer).
        n_users: Size of the user index space (users without events are allowed).
        n_items: Size of the item catalogue (items without events are allowed).

    Raises:
        DataError: The arrays differ in length or an index is outside its range.
    """

    user: IntArray
    item: IntArray
    timestamp: IntArray
    n_users: int
    n_items: int

    def __post_init__(self) -> None:
        for name in ("user", "item", "timestamp"):
            array = getattr(self, name)
            if array.ndim != 1:
                raise DataError(f"interactions.{name} must be one-dimensional, got {array.shape}")
        if not len(self.user) == len(self.item) == len(self.timestamp):
            raise DataError(
                "interactions.user, .item and .timestamp must have the same length, got "
                f"{len(self.user)}, {len(self.item)}, {len(self.timestamp)}"
            )
        if self.n_users < 0 or self.n_items < 1:
            raise DataError(
                f"need n_users >= 0 and n_items >= 1, got {self.n_users}, {self.n_items}"
            )
        if len(self.user) and (self.user.min() < 0 or self.user.max() >= self.n_users):
            raise DataError(f"user indices must lie in [0, {self.n_users})")
        if len(self.item) and (self.item.min() < 0 or self.item.max() >= self.n_items):
            raise DataError(f"item indices must lie in [0, {self.n_items})")

    @classmethod
    def from_arrays(
        cls,
        user: NDArray[np.integer],
        item: NDArray[np.integer],
        timestamp: NDArray[np.integer] | NDArray[np.floating],
        *,
        n_users: int,
        n_items: int,
    ) -> "Interactions":
        """Build a log from any integer (or integral float timestamp) arrays, copying to int64."""
        return cls(
            user=np.asarray(user, dtype=np.int64).copy(),
            item=np.asarray(item, dtype=np.int64).copy(),
            timestamp=np.asarray(timestamp, dtype=np.int64).copy(),
            n_users=int(n_users),
            n_items=int(n_items),
        )

    def __len__(self) -> int:
        return len(self.user)

    def keys(self) -> IntArray:
        """Return ``user * n_items + item`` per event: a unique integer per user-item pair."""
        return self.user * self.n_items + self.item

    def counts_per_user(self) -> IntArray:
        """Return the number of events of every user (length ``n_users``)."""
        return np.bincount(self.user, minlength=self.n_users).astype(np.int64)

    def counts_per_item(self) -> IntArray:
        """Return the number of events of every item (length ``n_items``)."""
        return np.bincount(self.item, minlength=self.n_items).astype(np.int64)

    def select(self, mask: NDArray[np.bool_]) -> "Interactions":
        """Return the events where ``mask`` is true, keeping both index spaces."""
        return Interactions(
            user=self.user[mask],
            item=self.item[mask],
            timestamp=self.timestamp[mask],
            n_users=self.n_users,
            n_items=self.n_items,
        )

    def restrict_users(self, users: IntArray) -> "Interactions":
        """Keep only the events of ``users`` and renumber them ``0..len(users)-1`` in that order.

        This turns a pooled log into a branch's log: the branch sees its own users under local
        indices and the shared item catalogue unchanged.

        Raises:
            DataError: ``users`` repeats a user or holds an index outside ``[0, n_users)``.
        """
        local = _local_index(users, self.n_users)
        keep = local[self.user] >= 0
        return Interactions(
            user=local[self.user[keep]],
            item=self.item[keep],
            timestamp=self.timestamp[keep],
            n_users=len(users),
            n_items=self.n_items,
        )


NO_ITEM: Final = -1
"""Marks an empty slot of `preceding_items` / `latest_items` (fewer earlier events)."""


def _time_order(log: Interactions, length: int) -> tuple[IntArray, IntArray, IntArray]:
    """Order events by user, then time (events in the same second keep the log's row order).

    Returns:
        The order, and the users and items in that order.

    Raises:
        DataError: ``length`` (of the history asked for) is negative.
    """
    if length < 0:
        raise DataError(f"length must be >= 0, got {length}")
    order: IntArray = np.lexsort((np.arange(len(log)), log.timestamp, log.user))
    return order, log.user[order], log.item[order]


def preceding_items(log: Interactions, length: int) -> IntArray:
    """Return, for every event, the items of its user's ``length`` previous events.

    Row ``j`` lists the items of the events of ``log.user[j]`` that came before event ``j``,
    the most recent first, padded with `NO_ITEM`. Time order as in `latest_items`.

    Returns:
        ``(len(log), length)`` item indices, rows in the log's order.

    Raises:
        DataError: ``length`` is negative.
    """
    order, users, items = _time_order(log, length)
    out = np.full((len(log), length), NO_ITEM, dtype=np.int64)
    for back in range(1, min(length, len(log) - 1) + 1):
        same = np.zeros(len(log), dtype=bool)
        same[back:] = users[back:] == users[:-back]
        column = np.full(len(log), NO_ITEM, dtype=np.int64)
        column[back:] = items[:-back]
        out[order, back - 1] = np.where(same, column, NO_ITEM)
    return out


def latest_items(log: Interactions, length: int) -> IntArray:
    """Return every user's ``length`` latest items, the most recent first.

    Events are ordered by timestamp; events in the same second keep the log's row order, the
    rule of `fedcrm.data.movielens.leave_one_out`.

    Returns:
        ``(n_users, length)`` item indices, padded with `NO_ITEM`.

    Raises:
        DataError: ``length`` is negative.
    """
    _, users, items = _time_order(log, length)
    counts = np.bincount(users, minlength=log.n_users)
    back = np.repeat(np.cumsum(counts), counts) - 1 - np.arange(len(log))  # 0 = latest
    out = np.full((log.n_users, length), NO_ITEM, dtype=np.int64)
    keep = back < length
    out[users[keep], back[keep]] = items[keep]
    return out


def _local_index(users: IntArray, n_users: int) -> IntArray:
    """Map global user index -> position in ``users`` (``-1`` for users not listed)."""
    users = np.asarray(users, dtype=np.int64)
    if len(users) and (users.min() < 0 or users.max() >= n_users):
        raise DataError(f"user indices must lie in [0, {n_users})")
    if len(np.unique(users)) != len(users):
        raise DataError("a user subset must not repeat a user")
    local = np.full(n_users, -1, dtype=np.int64)
    local[users] = np.arange(len(users), dtype=np.int64)
    return local


def synthetic_interactions(
    n_users: int,
    n_items: int,
    *,
    seed: int,
    n_groups: int = 4,
    per_user: tuple[int, int] = (8, 24),
    affinity: float = 0.85,
) -> Interactions:
    """Generate an implicit-feedback log whose users have learnable, group-shaped tastes.

    Users and items are split round-robin into ``n_groups`` taste groups. Each user draws
    between ``per_user[0]`` and ``per_user[1]`` distinct items: with probability ``affinity``
    from their own group (weighted by a Zipf-like item popularity), otherwise from the whole
    catalogue. Timestamps increase per user in draw order, with some ties, so time-based splits
    have something to break.

    Args:
        n_users: Number of users.
        n_items: Catalogue size; must leave every user enough distinct items.
        seed: Seed of the generator; the same seed gives the same log.
        n_groups: Number of taste groups (1 gives pure popularity structure).
        per_user: Inclusive range of the number of distinct items per user.
        affinity: Probability that a draw comes from the user's own group.

    Returns:
        The log, with ``n_users`` users and ``n_items`` items.

    Raises:
        DataError: The parameters cannot produce a valid log.
    """
    low, high = per_user
    if n_users < 1 or n_groups < 1 or not 0 <= low <= high:
        raise DataError("need n_users >= 1, n_groups >= 1 and 0 <= per_user[0] <= per_user[1]")
    if n_items < max(2 * high, n_groups):
        raise DataError(f"n_items={n_items} too small for up to {high} distinct items per user")
    if not 0.0 <= affinity <= 1.0:
        raise DataError(f"affinity must lie in [0, 1], got {affinity}")
    rng = np.random.default_rng(seed)
    item_group = np.arange(n_items) % n_groups
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.7
    popularity = popularity[rng.permutation(n_items)]
    users: list[IntArray] = []
    items: list[IntArray] = []
    stamps: list[IntArray] = []
    for u in range(n_users):
        count = int(rng.integers(low, high + 1))
        in_group = popularity * (item_group == u % n_groups)
        in_group /= in_group.sum()
        everywhere = popularity / popularity.sum()
        weights = affinity * in_group + (1.0 - affinity) * everywhere
        chosen = rng.choice(n_items, size=count, replace=False, p=weights)
        start = int(rng.integers(0, 1_000_000))
        # Steps of 0 make ties in time, which the leave-one-out split must break deterministically.
        steps = rng.integers(0, 3, size=count)
        users.append(np.full(count, u, dtype=np.int64))
        items.append(chosen.astype(np.int64))
        stamps.append(start + np.cumsum(steps))
    return Interactions.from_arrays(
        np.concatenate(users),
        np.concatenate(items),
        np.concatenate(stamps),
        n_users=n_users,
        n_items=n_items,
    )
