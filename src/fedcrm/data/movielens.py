"""MovieLens 100K as regional branches, the leave-one-out split and fixed sampled negatives.

The data is read from the RecBole package files (``recbole/dataset_example/ml-100k``, installed
with ``--no-deps``; recbole itself is never imported). Its licence forbids redistribution, so
nothing here writes the data anywhere: the only file this module writes is the sampled-negatives
file, which holds indices of items a user did *not* interact with.

Protocol (He et al. 2017, "Neural Collaborative Filtering", WWW, arXiv:1708.05031):

* implicit feedback: every rating, whatever its value, is one interaction;
* leave-one-out by time: each eligible user's latest interaction is the test item and the one
  before it the validation item; the rest is training data;
* ranking against 99 sampled negatives per user (fixed per seed), and against the full
  catalogue.

Branches are US ZIP zones: the first digit of a user's ZIP code (0 = New England ... 9 = West
Coast). Codes that are not all digits (Canadian postcodes and the like) form one extra branch.
"""

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fedcrm.data._packages import package_file
from fedcrm.data.interactions import IntArray, Interactions, _local_index
from fedcrm.exceptions import DataError

RECBOLE: Final = "recbole"
ML100K_INTER: Final = "dataset_example/ml-100k/ml-100k.inter"
ML100K_USER: Final = "dataset_example/ml-100k/ml-100k.user"

MIN_INTERACTIONS_FOR_EVAL: Final = 3
"""A user needs a training, a validation and a test interaction to be evaluated."""
NUM_SAMPLED_NEGATIVES: Final = 99
"""Negatives per evaluated user in the sampled protocol (He et al. 2017)."""
OTHER_ZONE: Final = 10
"""Branch id of the users whose postal code is not all digits."""

ZIP_ZONE_REGIONS: Final[dict[int, str]] = {
    0: "New England, NJ, PR",
    1: "NY, PA, DE",
    2: "DC, MD, VA, WV, NC, SC",
    3: "AL, FL, GA, MS, TN",
    4: "IN, KY, MI, OH",
    5: "IA, MN, MT, ND, SD, WI",
    6: "IL, KS, MO, NE",
    7: "AR, LA, OK, TX",
    8: "AZ, CO, ID, NM, NV, UT, WY",
    9: "AK, CA, HI, OR, WA",
    OTHER_ZONE: "non-US postal codes",
}


@dataclass(frozen=True)
class Branch:
    """A regional branch: one US ZIP zone, or the branch of non-numeric postal codes.

    Attributes:
        branch_id: The zone digit 0-9, or `OTHER_ZONE` (10) for non-numeric codes.
        name: Stable name, ``zip-0`` ... ``zip-9`` or ``zip-other``.
        region: The states (or description) the zone covers.
    """

    branch_id: int
    name: str
    region: str


def zip_zone(zip_code: str) -> int:
    """Return the branch id of a postal code: its first digit if it is all digits, else 10.

    >>> zip_zone("94043"), zip_zone("01002"), zip_zone("T8H1N")
    (9, 0, 10)
    """
    code = zip_code.strip()
    if code and code.isascii() and code.isdigit():
        return int(code[0])
    return OTHER_ZONE


def make_branch(branch_id: int) -> Branch:
    """Return the `Branch` of a zone id (0-9 or `OTHER_ZONE`).

    Raises:
        DataError: ``branch_id`` is not a zone id.
    """
    if branch_id not in ZIP_ZONE_REGIONS:
        raise DataError(f"branch id must be 0-9 or {OTHER_ZONE}, got {branch_id}")
    name = "zip-other" if branch_id == OTHER_ZONE else f"zip-{branch_id}"
    return Branch(branch_id=branch_id, name=name, region=ZIP_ZONE_REGIONS[branch_id])


@dataclass(frozen=True)
class RecData:
    """A recommendation data set with users assigned to regional branches.

    Attributes:
        interactions: Every interaction, with global dense user and item indices.
        user_ids: Raw user token of each dense user index.
        item_ids: Raw item token of each dense item index (the shared catalogue).
        user_branch: Branch id of each dense user index.
        branches: The branches that have at least one user, sorted by id.
    """

    interactions: Interactions
    user_ids: tuple[str, ...]
    item_ids: tuple[str, ...]
    user_branch: IntArray
    branches: tuple[Branch, ...]

    @property
    def n_users(self) -> int:
        """Number of users."""
        return self.interactions.n_users

    @property
    def n_items(self) -> int:
        """Number of catalogue items."""
        return self.interactions.n_items

    def branch(self, key: int | str) -> Branch:
        """Return a branch by id or by name.

        Raises:
            DataError: No branch of this data set has that id or name.
        """
        for branch in self.branches:
            if key in (branch.branch_id, branch.name):
                return branch
        known = ", ".join(b.name for b in self.branches)
        raise DataError(f"unknown branch {key!r}; known branches: {known}")

    def branch_users(self, key: int | str) -> IntArray:
        """Return the global indices of a branch's users, ascending."""
        branch_id = self.branch(key).branch_id
        return np.flatnonzero(self.user_branch == branch_id).astype(np.int64)


def _dense_ids(tokens: pd.Series) -> tuple[IntArray, tuple[str, ...]]:
    """Map string tokens to dense indices ordered numerically when numeric, else lexically."""
    uniques = sorted(set(tokens), key=lambda t: (0, int(t), t) if t.isdigit() else (1, 0, t))
    lookup = {token: index for index, token in enumerate(uniques)}
    codes = tokens.map(lookup).to_numpy(dtype=np.int64)
    return codes, tuple(uniques)


def _read_atomic(path: Path, columns: dict[str, str]) -> pd.DataFrame:
    """Read a RecBole atomic file (tab-separated, ``name:type`` headers) as strings."""
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    frame.columns = [str(c).split(":", 1)[0] for c in frame.columns]
    missing = sorted(set(columns) - set(frame.columns))
    if missing:
        raise DataError(f"{path.name} lacks column(s) {missing}; has {list(frame.columns)}")
    return frame[list(columns)].rename(columns=columns)


def load_movielens(inter_path: Path, user_path: Path) -> RecData:
    """Load a MovieLens log in RecBole's atomic format and assign users to ZIP-zone branches.

    Implicit feedback: every rating is one interaction (the rating value is not used). A user
    who rated the same item twice keeps one interaction, the latest.

    Args:
        inter_path: The ``.inter`` file (``user_id``, ``item_id``, ``timestamp`` columns).
        user_path: The ``.user`` file (``user_id``, ``zip_code`` columns).

    Returns:
        The data set with global dense indices and the branches present in it.

    Raises:
        DataError: A file is unreadable, lacks a column, has a non-integral timestamp, or a user
            of the log has no row in the user file.
    """
    inter = _read_atomic(inter_path, {"user_id": "user", "item_id": "item", "timestamp": "ts"})
    users = _read_atomic(user_path, {"user_id": "user", "zip_code": "zip"})
    stamps = pd.to_numeric(inter["ts"], errors="coerce").to_numpy(dtype=np.float64)
    if np.isnan(stamps).any() or (stamps != np.floor(stamps)).any():
        raise DataError(f"{inter_path.name}: every timestamp must be an integer number of seconds")
    zip_of = dict(zip(users["user"], users["zip"], strict=True))
    unknown = sorted(set(inter["user"]) - zip_of.keys())
    if unknown:
        raise DataError(f"{len(unknown)} user(s) of {inter_path.name} have no row in the user file")
    user_codes, user_ids = _dense_ids(inter["user"])
    item_codes, item_ids = _dense_ids(inter["item"])
    log = _dedupe_latest(
        Interactions.from_arrays(
            user_codes, item_codes, stamps, n_users=len(user_ids), n_items=len(item_ids)
        )
    )
    user_branch = np.array([zip_zone(zip_of[u]) for u in user_ids], dtype=np.int64)
    branches = tuple(make_branch(int(b)) for b in np.unique(user_branch))
    return RecData(
        interactions=log,
        user_ids=user_ids,
        item_ids=item_ids,
        user_branch=user_branch,
        branches=branches,
    )


def load_movielens_100k() -> RecData:
    """Load MovieLens 100K from the installed ``recbole`` package files (943 users, 1,682 items).

    Raises:
        DataPackageMissing: ``recbole`` is not installed (``pip install --no-deps recbole==1.2.1``).
    """
    return load_movielens(package_file(RECBOLE, ML100K_INTER), package_file(RECBOLE, ML100K_USER))


def _dedupe_latest(log: Interactions) -> Interactions:
    """Keep one event per user-item pair: the latest (equal times: the later row), in row order."""
    order = np.lexsort((log.timestamp, log.keys()))
    keys = log.keys()[order]
    last = np.ones(len(keys), dtype=bool)
    last[:-1] = keys[1:] != keys[:-1]
    if last.all():
        return log
    keep = np.zeros(len(log), dtype=bool)
    keep[order[last]] = True
    return log.select(keep)


@dataclass(frozen=True)
class LeaveOneOutSplit:
    """Leave-one-out split by time (He et al. 2017).

    Attributes:
        train: Training interactions: everything except the evaluated users' last two.
        eval_users: Users evaluated (those with at least `MIN_INTERACTIONS_FOR_EVAL`
            distinct items), ascending.
        val_items: Validation item of each evaluated user (second latest interaction).
        test_items: Test item of each evaluated user (latest interaction).
        validation_in_train: ``train`` also holds the validation items (the final fit, see
            `with_validation_in_train`).
    """

    train: Interactions
    eval_users: IntArray
    val_items: IntArray
    test_items: IntArray
    validation_in_train: bool = False

    @property
    def n_users(self) -> int:
        """Size of the user index space."""
        return self.train.n_users

    @property
    def n_items(self) -> int:
        """Size of the item catalogue."""
        return self.train.n_items

    def targets(self, target: str) -> IntArray:
        """Return the held-out items for ``target`` ``"test"`` or ``"val"``.

        Raises:
            DataError: ``target`` is neither.
        """
        if target == "test":
            return self.test_items
        if target == "val":
            return self.val_items
        raise DataError(f"target must be 'test' or 'val', got {target!r}")

    def fingerprint(self) -> str:
        """Return a SHA-256 digest of the split, to tie a negatives file to it."""
        digest = hashlib.sha256()
        digest.update(np.array([self.n_users, self.n_items], dtype=np.int64).tobytes())
        for array in (np.sort(self.train.keys()), self.eval_users, self.val_items, self.test_items):
            digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def with_validation_in_train(self) -> "LeaveOneOutSplit":
        """Return the split whose training log also holds every validation item.

        For the final fit after model selection (He et al. 2017 train on everything but the
        test item): choose settings and the number of epochs or rounds on the validation items
        first, then train on training plus validation items and measure the test items once.
        The validation events get a time after every training event, so they stay each user's
        latest training event. The validation metrics of such a split are no longer held out.
        """
        if self.validation_in_train:
            return self
        train = self.train
        later = int(train.timestamp.max()) + 1 if len(train) else 0
        merged = Interactions(
            user=np.concatenate([train.user, self.eval_users]),
            item=np.concatenate([train.item, self.val_items]),
            timestamp=np.concatenate(
                [train.timestamp, np.full(len(self.eval_users), later, dtype=np.int64)]
            ),
            n_users=train.n_users,
            n_items=train.n_items,
        )
        return LeaveOneOutSplit(
            train=merged,
            eval_users=self.eval_users,
            val_items=self.val_items,
            test_items=self.test_items,
            validation_in_train=True,
        )

    def history(self, target: str) -> Interactions:
        """Return the events known before ``target``.

        The training events, and for the test target the validation events too (they happened
        before it, whether trained on or not).

        Raises:
            DataError: ``target`` is neither ``"test"`` nor ``"val"``.
        """
        self.targets(target)
        if target == "test":
            return self.with_validation_in_train().train
        return self.train

    def keep_users(self, keep: NDArray[np.bool_]) -> "LeaveOneOutSplit":
        """Return the split of the users where ``keep`` (one flag per user) is true.

        The index spaces stay as they are, so a branch's user factors keep their rows when the
        consent gate leaves some customers out.
        """
        evaluated = keep[self.eval_users]
        return LeaveOneOutSplit(
            train=self.train.select(keep[self.train.user]),
            eval_users=self.eval_users[evaluated],
            val_items=self.val_items[evaluated],
            test_items=self.test_items[evaluated],
            validation_in_train=self.validation_in_train,
        )

    def restrict_users(self, users: IntArray) -> "LeaveOneOutSplit":
        """Return the split of ``users`` only, renumbered ``0..len(users)-1`` in that order.

        Splitting is per user, so restricting a pooled split equals splitting a branch's data.
        """
        local = _local_index(users, self.n_users)
        kept = local[self.eval_users] >= 0
        order = np.argsort(local[self.eval_users][kept], kind="stable")
        return LeaveOneOutSplit(
            train=self.train.restrict_users(users),
            eval_users=local[self.eval_users][kept][order],
            val_items=self.val_items[kept][order],
            test_items=self.test_items[kept][order],
            validation_in_train=self.validation_in_train,
        )


def leave_one_out(log: Interactions) -> LeaveOneOutSplit:
    """Split a log leave-one-out by time.

    Per user, events are ordered by timestamp; events in the same second keep the order of the
    log (the later row counts as later), as a stable sort of the data file does in He et al.'s
    preprocessing. The rule is deterministic for a given file and, unlike breaking ties by item
    id, does not bias held-out items towards high (in MovieLens: later-catalogued) ids; 44 % of
    ML-100K users rated several items in their last second. Repeated user-item pairs are first
    reduced to the latest one. A user with at least `MIN_INTERACTIONS_FOR_EVAL` (3) distinct
    items gives the latest one as test item and the one before it as validation item; a user
    with fewer keeps all events in training and is not evaluated.

    Args:
        log: The interactions to split.

    Returns:
        The split; ``train`` keeps the index spaces of ``log``.
    """
    log = _dedupe_latest(log)
    order = np.lexsort((np.arange(len(log)), log.timestamp, log.user))
    users = log.user[order]
    counts = np.bincount(users, minlength=log.n_users)
    ends = np.cumsum(counts)  # one past each user's latest event, in sorted order
    eval_users = np.flatnonzero(counts >= MIN_INTERACTIONS_FOR_EVAL).astype(np.int64)
    test_pos = ends[eval_users] - 1
    val_pos = ends[eval_users] - 2
    held_out = np.zeros(len(log), dtype=bool)
    held_out[order[test_pos]] = True
    held_out[order[val_pos]] = True
    return LeaveOneOutSplit(
        train=log.select(~held_out),
        eval_users=eval_users,
        val_items=log.item[order[val_pos]],
        test_items=log.item[order[test_pos]],
    )


@dataclass(frozen=True)
class SampledNegatives:
    """Fixed sampled negatives per evaluated user.

    Attributes:
        users: The evaluated users, aligned with the split's ``eval_users``.
        items: ``(len(users), n)`` item indices, none of which the user interacted with.
        seed: The seed they were drawn with.
    """

    users: IntArray
    items: NDArray[np.int64]
    seed: int

    def keep_users(self, keep: NDArray[np.bool_]) -> "SampledNegatives":
        """Return the rows of the users where ``keep`` is true (`LeaveOneOutSplit.keep_users`)."""
        rows = keep[self.users]
        return SampledNegatives(users=self.users[rows], items=self.items[rows], seed=self.seed)

    def restrict_users(self, users: IntArray, n_users: int) -> "SampledNegatives":
        """Return the rows of ``users`` only, renumbered as `LeaveOneOutSplit.restrict_users` does.

        Args:
            users: Global indices of the users to keep, in their new order.
            n_users: Size of the global user index space.
        """
        local = _local_index(users, n_users)
        kept = local[self.users] >= 0
        order = np.argsort(local[self.users][kept], kind="stable")
        return SampledNegatives(
            users=local[self.users][kept][order],
            items=self.items[kept][order],
            seed=self.seed,
        )


def _seen_items(split: LeaveOneOutSplit) -> list[IntArray]:
    """Return every item each user interacted with (train, validation and test)."""
    user = np.concatenate([split.train.user, split.eval_users, split.eval_users])
    item = np.concatenate([split.train.item, split.val_items, split.test_items])
    order = np.argsort(user, kind="stable")
    bounds = np.cumsum(np.bincount(user, minlength=split.n_users))[:-1]
    return np.split(item[order], bounds)


def sample_negatives(
    split: LeaveOneOutSplit, *, seed: int, n: int = NUM_SAMPLED_NEGATIVES
) -> SampledNegatives:
    """Draw ``n`` distinct negatives per evaluated user, uniformly among items they never saw.

    Each user's draw uses its own generator seeded with ``(seed, user)``, so a user's negatives
    do not depend on other users and the same seed always gives the same negatives.

    Raises:
        DataError: ``n < 1`` or a user has fewer than ``n`` items they never interacted with.
    """
    if n < 1:
        raise DataError(f"the number of negatives must be >= 1, got {n}")
    seen = _seen_items(split)
    items = np.empty((len(split.eval_users), n), dtype=np.int64)
    catalogue = np.arange(split.n_items, dtype=np.int64)
    for row, user in enumerate(split.eval_users):
        unseen = np.setdiff1d(catalogue, seen[user], assume_unique=False)
        if len(unseen) < n:
            raise DataError(
                f"a user has only {len(unseen)} unseen items, fewer than the {n} negatives needed"
            )
        rng = np.random.default_rng([seed, int(user)])
        items[row] = rng.choice(unseen, size=n, replace=False)
    return SampledNegatives(users=split.eval_users.copy(), items=items, seed=seed)


def negatives_path(directory: Path, *, name: str, seed: int, n: int) -> Path:
    """Return where `load_or_sample_negatives` keeps a data set's negatives for a seed."""
    return directory / f"{name}-negatives-n{n}-seed{seed}.npz"


def load_or_sample_negatives(
    directory: Path,
    split: LeaveOneOutSplit,
    *,
    seed: int,
    name: str = "ml-100k",
    n: int = NUM_SAMPLED_NEGATIVES,
) -> SampledNegatives:
    """Return the fixed negatives of ``split`` for ``seed``, sampling and saving them once.

    The file (``.npz``, a few hundred KB for ML-100K) stores the users, the negative item
    indices, the seed and the split's fingerprint; it is loaded with ``allow_pickle=False``.

    Args:
        directory: Where the file lives (created if needed); never inside the repository.
        split: The split the negatives belong to.
        seed: Sampling seed; one file per seed.
        name: Data-set name used in the file name.
        n: Negatives per user.

    Raises:
        DataError: The file exists but belongs to another split, seed or size.
    """
    path = negatives_path(directory, name=name, seed=seed, n=n)
    fingerprint = split.fingerprint()
    if path.exists():
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["fingerprint"]) != fingerprint or int(stored["seed"]) != seed:
                raise DataError(
                    f"{path} was sampled for a different split or seed; delete it to resample"
                )
            items = stored["items"].astype(np.int64)
            if items.shape != (len(split.eval_users), n):
                raise DataError(f"{path} holds {items.shape} negatives, expected {n} per user")
            return SampledNegatives(users=split.eval_users.copy(), items=items, seed=seed)
    negatives = sample_negatives(split, seed=seed, n=n)
    directory.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader never sees a half-written file.
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez_compressed(
                handle,
                users=negatives.users,
                items=negatives.items.astype(np.int32),
                seed=np.int64(seed),
                fingerprint=np.str_(fingerprint),
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return negatives


@dataclass(frozen=True)
class BranchView:
    """What one branch holds: its users (local indices), their split and negatives.

    Attributes:
        branch: The branch.
        global_users: Global index of each local user (local index = position).
        split: The branch's split, with local user indices and the shared item catalogue.
        negatives: The branch's sampled negatives, aligned with ``split.eval_users``.
    """

    branch: Branch
    global_users: IntArray
    split: LeaveOneOutSplit
    negatives: SampledNegatives


def branch_view(
    data: RecData, split: LeaveOneOutSplit, negatives: SampledNegatives, key: int | str
) -> BranchView:
    """Cut a branch's share out of a pooled split (by branch id or name).

    Raises:
        DataError: The branch is unknown.
    """
    branch = data.branch(key)
    users = data.branch_users(branch.branch_id)
    return BranchView(
        branch=branch,
        global_users=users,
        split=split.restrict_users(users),
        negatives=negatives.restrict_users(users, split.n_users),
    )
