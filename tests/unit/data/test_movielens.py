"""MovieLens loader, ZIP-zone branches, leave-one-out split and negatives, on synthetic data."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrm.data.interactions import Interactions, latest_items, synthetic_interactions
from fedcrm.data.movielens import (
    MIN_INTERACTIONS_FOR_EVAL,
    OTHER_ZONE,
    branch_view,
    leave_one_out,
    load_movielens,
    load_or_sample_negatives,
    make_branch,
    negatives_path,
    sample_negatives,
    zip_zone,
)
from fedcrm.exceptions import DataError

# A tiny made-up log in RecBole's atomic format: (user token, item token, rating, timestamp).
ROWS = [
    ("10", "7", 5, 100),
    ("10", "3", 1, 200),
    ("10", "9", 3, 300),
    ("10", "3", 4, 250),  # repeated pair: the latest (250) is kept
    ("10", "20", 2, 50),
    ("2", "7", 2, 50),
    ("2", "12", 5, 60),
    ("2", "9", 4, 60),  # tie with item 12 at t=60: the later row counts as later
    ("2", "3", 1, 10),
    ("5", "7", 4, 1),  # only two interactions: not evaluated
    ("5", "12", 4, 2),
]
USERS = [("10", "94043"), ("2", "01002"), ("5", "T8H1N"), ("99", "55455")]


def write_atomic(directory: Path, rows=ROWS, users=USERS) -> tuple[Path, Path]:
    inter = directory / "toy.inter"
    user = directory / "toy.user"
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in rows]
    inter.write_text("\n".join(lines) + "\n")
    ulines = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
    ulines += [f"{u}\t30\tF\tother\t{z}" for u, z in users]
    user.write_text("\n".join(ulines) + "\n")
    return inter, user


@pytest.fixture
def toy(tmp_path):
    return load_movielens(*write_atomic(tmp_path))


@pytest.fixture(scope="module")
def synthetic() -> Interactions:
    return synthetic_interactions(60, 150, seed=3, per_user=(1, 20))


@pytest.mark.parametrize(
    ("code", "zone"),
    [
        ("94043", 9),
        ("01002", 0),
        ("55455", 5),
        (" 12345 ", 1),
        ("T8H1N", OTHER_ZONE),
        ("E2A4H", OTHER_ZONE),
        ("", OTHER_ZONE),
        ("１２３４５", OTHER_ZONE),
    ],
    ids=["west", "leading-zero", "midwest", "padded", "canada", "canada-2", "empty", "fullwidth"],
)
def test_zip_zone(code, zone):
    assert zip_zone(code) == zone


def test_make_branch_names_are_stable():
    assert make_branch(0).name == "zip-0"
    assert make_branch(OTHER_ZONE).name == "zip-other"
    with pytest.raises(DataError, match="branch id"):
        make_branch(11)


def test_loader_dense_ids_branches_and_implicit_feedback(toy):
    assert toy.user_ids == ("2", "5", "10")  # numeric order, users without events dropped
    assert toy.item_ids == ("3", "7", "9", "12", "20")
    assert toy.n_users == 3 and toy.n_items == 5
    assert len(toy.interactions) == 10  # every rating counts, the repeated pair once
    assert [b.name for b in toy.branches] == ["zip-0", "zip-9", "zip-other"]
    assert toy.branch_users("zip-9").tolist() == [2]
    assert toy.branch_users(OTHER_ZONE).tolist() == [1]
    with pytest.raises(DataError, match="unknown branch"):
        toy.branch("zip-4")
    user10, item3 = 2, 0
    mask = (toy.interactions.user == user10) & (toy.interactions.item == item3)
    assert toy.interactions.timestamp[mask].tolist() == [250]


def test_loader_rejects_users_without_zip(tmp_path):
    inter, user = write_atomic(tmp_path, users=USERS[:2])
    with pytest.raises(DataError, match="no row in the user file"):
        load_movielens(inter, user)


def test_loader_rejects_missing_column(tmp_path):
    inter, user = write_atomic(tmp_path)
    inter.write_text("user_id:token\titem_id:token\n1\t2\n")
    with pytest.raises(DataError, match="timestamp"):
        load_movielens(inter, user)


def test_split_on_toy_log_by_hand(toy):
    split = leave_one_out(toy.interactions)
    # dense: users 2->0, 5->1, 10->2; items 3->0, 7->1, 9->2, 12->3, 20->4
    assert split.eval_users.tolist() == [0, 2]
    assert split.test_items.tolist() == [2, 2]  # user 2: item 9 (later row at t=60); 10: item 9
    assert split.val_items.tolist() == [3, 0]  # user 2: item 12, user 10: item 3 (t=250)
    train = sorted(zip(split.train.user.tolist(), split.train.item.tolist(), strict=True))
    assert train == [(0, 0), (0, 1), (1, 1), (1, 3), (2, 1), (2, 4)]


def reference_split(log: Interactions):
    """Independent pandas reference: dedupe pairs (latest, then later row), stable time order."""
    frame = pd.DataFrame({"u": log.user, "i": log.item, "t": log.timestamp})
    frame["row"] = np.arange(len(frame))
    frame = frame.sort_values(["u", "i", "t", "row"]).drop_duplicates(["u", "i"], keep="last")
    frame = frame.sort_values(["u", "t", "row"])
    expected = {}
    for user, events in frame.groupby("u"):
        if len(events) >= MIN_INTERACTIONS_FOR_EVAL:
            expected[user] = (events["i"].iloc[-2], events["i"].iloc[-1])
    return expected


def test_split_one_val_one_test_per_eligible_user_latest_by_time(synthetic):
    split = leave_one_out(synthetic)
    counts = synthetic.counts_per_user()
    assert split.eval_users.tolist() == np.flatnonzero(counts >= 3).tolist()
    assert 0 < len(split.eval_users) < synthetic.n_users  # some users are too short
    expected = reference_split(synthetic)
    got = dict(
        zip(
            split.eval_users.tolist(),
            zip(split.val_items, split.test_items, strict=True),
            strict=True,
        )
    )
    assert got == expected
    # Exactly one val and one test item left each eligible user; everything else is training.
    assert np.array_equal(split.train.counts_per_user(), counts - 2 * (counts >= 3))
    held = set(zip(split.eval_users.tolist(), split.test_items.tolist(), strict=True))
    held |= set(zip(split.eval_users.tolist(), split.val_items.tolist(), strict=True))
    train = set(zip(split.train.user.tolist(), split.train.item.tolist(), strict=True))
    original = set(zip(synthetic.user.tolist(), synthetic.item.tolist(), strict=True))
    assert train.isdisjoint(held) and train | held == original
    # Held-out items are never earlier than any training event of the same user.
    last_train = np.full(synthetic.n_users, np.iinfo(np.int64).min)
    np.maximum.at(last_train, split.train.user, split.train.timestamp)
    stamp = {
        (u, i): t
        for u, i, t in zip(synthetic.user, synthetic.item, synthetic.timestamp, strict=True)
    }
    for user, val, test in zip(split.eval_users, split.val_items, split.test_items, strict=True):
        assert last_train[user] <= stamp[(user, val)] <= stamp[(user, test)]


@settings(max_examples=40, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 9), st.integers(0, 4)), min_size=1, max_size=60
    )
)
def test_split_property_matches_reference(events):
    user, item, stamp = (np.array(c, dtype=np.int64) for c in zip(*events, strict=True))
    log = Interactions.from_arrays(user, item, stamp, n_users=6, n_items=10)
    split = leave_one_out(log)
    n_pairs = len(set(zip(user.tolist(), item.tolist(), strict=True)))
    expected = reference_split(log)
    got = dict(
        zip(
            split.eval_users.tolist(),
            zip(split.val_items.tolist(), split.test_items.tolist(), strict=True),
            strict=True,
        )
    )
    assert got == {u: (int(v), int(t)) for u, (v, t) in expected.items()}
    assert len(split.train) + 2 * len(split.eval_users) == n_pairs


def test_restricting_a_split_equals_splitting_the_branch(synthetic):
    users = np.array([17, 3, 40, 8], dtype=np.int64)
    pooled = leave_one_out(synthetic).restrict_users(users)
    direct = leave_one_out(synthetic.restrict_users(users))
    assert pooled.fingerprint() == direct.fingerprint()
    with pytest.raises(DataError, match="repeat"):
        leave_one_out(synthetic).restrict_users(np.array([1, 1]))


def test_negatives_exclude_every_seen_item_and_are_distinct(synthetic):
    split = leave_one_out(synthetic)
    negatives = sample_negatives(split, seed=7, n=99)
    assert negatives.items.shape == (len(split.eval_users), 99)
    for row, user in enumerate(split.eval_users):
        seen = set(synthetic.item[synthetic.user == user].tolist())
        drawn = negatives.items[row].tolist()
        assert len(set(drawn)) == 99
        assert seen.isdisjoint(drawn)
        assert all(0 <= i < synthetic.n_items for i in drawn)


def test_negatives_are_stable_for_a_seed_and_per_user(synthetic):
    split = leave_one_out(synthetic)
    first = sample_negatives(split, seed=7)
    assert np.array_equal(first.items, sample_negatives(split, seed=7).items)
    assert not np.array_equal(first.items, sample_negatives(split, seed=8).items)
    # A user's negatives do not depend on the other users: change user u's history only.
    u = int(split.eval_users[0])
    changed = synthetic.select((synthetic.user != u) | (synthetic.item % 2 == 0))
    resampled = sample_negatives(leave_one_out(changed), seed=7)
    common = np.intersect1d(split.eval_users[1:], resampled.users)
    rows_before = np.searchsorted(first.users, common)
    rows_after = np.searchsorted(resampled.users, common)
    assert len(common) > 10
    assert np.array_equal(first.items[rows_before], resampled.items[rows_after])


def test_too_few_unseen_items_is_an_error(synthetic):
    with pytest.raises(DataError, match="unseen items"):
        sample_negatives(leave_one_out(synthetic), seed=0, n=140)


def test_negatives_file_round_trip_and_guard(tmp_path, synthetic):
    split = leave_one_out(synthetic)
    first = load_or_sample_negatives(tmp_path, split, seed=5, name="toy", n=20)
    path = negatives_path(tmp_path, name="toy", seed=5, n=20)
    assert path.is_file() and path.stat().st_size < 20_000
    again = load_or_sample_negatives(tmp_path, split, seed=5, name="toy", n=20)
    assert np.array_equal(first.items, again.items)
    assert np.array_equal(first.items, sample_negatives(split, seed=5, n=20).items)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left
    other = leave_one_out(synthetic_interactions(60, 150, seed=4, per_user=(1, 20)))
    with pytest.raises(DataError, match="different split"):
        load_or_sample_negatives(tmp_path, other, seed=5, name="toy", n=20)


def test_branch_view_cuts_users_split_and_negatives(toy):
    split = leave_one_out(toy.interactions)
    negatives = sample_negatives(split, seed=0, n=1)
    view = branch_view(toy, split, negatives, "zip-0")
    assert view.global_users.tolist() == [0]
    assert view.split.n_users == 1 and view.split.n_items == toy.n_items
    assert view.split.eval_users.tolist() == [0]
    assert view.negatives.users.tolist() == [0]
    assert view.negatives.items.tolist() == negatives.items[:1].tolist()
    empty = branch_view(toy, split, negatives, OTHER_ZONE)
    assert len(empty.split.eval_users) == 0 and len(empty.split.train) == 2


def test_interactions_validate_ranges():
    with pytest.raises(DataError, match="item indices"):
        Interactions.from_arrays(np.array([0]), np.array([5]), np.array([0]), n_users=1, n_items=5)
    with pytest.raises(DataError, match="same length"):
        Interactions.from_arrays(
            np.array([0, 0]), np.array([1]), np.array([0]), n_users=1, n_items=5
        )


def test_validation_items_join_training_as_each_users_latest_event(synthetic):
    split = leave_one_out(synthetic)
    merged = split.with_validation_in_train()
    assert len(merged.train) == len(split.train) + len(split.eval_users)
    np.testing.assert_array_equal(merged.test_items, split.test_items)
    keys = set(merged.train.keys().tolist())
    assert all(
        u * split.n_items + i in keys
        for u, i in zip(split.eval_users, split.val_items, strict=True)
    )
    assert not any(
        u * split.n_items + t in keys
        for u, t in zip(split.eval_users, split.test_items, strict=True)
    )
    for user, val in zip(split.eval_users[:10], split.val_items[:10], strict=True):
        mine = merged.train.user == user
        latest = merged.train.timestamp[mine].max()
        assert merged.train.item[mine][merged.train.timestamp[mine] == latest].tolist() == [val]


def test_history_before_each_target(synthetic):
    split = leave_one_out(synthetic)
    merged = split.with_validation_in_train()
    assert merged.validation_in_train and not split.validation_in_train
    assert merged.with_validation_in_train() is merged  # the validation items join once
    assert split.history("val") is split.train
    # The test target's history ends with the validation item, trained on or not.
    for s in (split, merged):
        latest = latest_items(s.history("test"), 1)[s.eval_users, 0]
        np.testing.assert_array_equal(latest, s.val_items)
    assert merged.restrict_users(merged.eval_users[:5]).validation_in_train
    with pytest.raises(DataError, match="target"):
        split.history("train")
