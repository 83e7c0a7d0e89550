"""A recommendation branch's data: its customers, their leave-one-out split and negatives.

A simulated branch cuts its share out of the experiment's data set in memory (MovieLens 100K is
read from the installed ``recbole`` package on every side and never written anywhere; its
licence forbids redistribution); a deployed branch reads its own interaction export and the
shared catalogue (`fedcrm.data.interaction_export`). Either way the branch holds local user
indices, the shared item catalogue, and the pseudonym of each customer (keyed HMAC under the
branch key), which the consent gate and the round manifests use.
"""

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import numpy as np
import pandas as pd

from fedcrm.data.interaction_export import read_catalogue, read_interaction_export
from fedcrm.data.interactions import Interactions, synthetic_interactions
from fedcrm.data.movielens import (
    BranchView,
    LeaveOneOutSplit,
    RecData,
    SampledNegatives,
    branch_view,
    leave_one_out,
    load_movielens_100k,
    load_or_sample_negatives,
    make_branch,
    sample_negatives,
)
from fedcrm.data.pseudonymise import pseudonymise_series
from fedcrm.exceptions import ConfigError, DataError
from fedcrm.seeds import Stream, generator, integer

RecDataset = Literal["movielens-100k", "synthetic"]


@dataclass(frozen=True)
class SyntheticRecConfig:
    """Synthetic interactions (`fedcrm.data.interactions.synthetic_interactions`).

    Attributes:
        users: Users with history.
        items: Catalogue size (at least 100 + ``max_per_user``, for 99 sampled negatives).
        branches: Branches (1-11); users are assigned with uneven shares.
        groups: Taste groups.
        min_per_user: Fewest distinct items per user.
        max_per_user: Most distinct items per user.
        cold_customers: Extra customers per branch with no history at all.
    """

    users: int = 120
    items: int = 150
    branches: int = 3
    groups: int = 4
    min_per_user: int = 8
    max_per_user: int = 24
    cold_customers: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.branches <= 11:
            raise ConfigError(f"[synthetic] branches must lie in [1, 11], got {self.branches}")
        if self.users < self.branches or self.groups < 1 or self.cold_customers < 0:
            raise ConfigError("[synthetic] needs users >= branches, groups >= 1, cold >= 0")
        if not 3 <= self.min_per_user <= self.max_per_user:
            raise ConfigError("[synthetic] needs 3 <= min-per-user <= max-per-user")
        if self.items < 100 + self.max_per_user:
            raise ConfigError(f"[synthetic] items must be >= 100 + max-per-user, got {self.items}")


@dataclass(frozen=True)
class RecBaselines:
    """Centralised baselines on the same split: popularity, item-kNN and MF (``[baselines]``).

    Attributes:
        enabled: Train them.
        mf_epochs: Epochs of the centralised MF (early-stopped on validation).
        knn_neighbours: Item-kNN neighbourhood (0: all items).
    """

    enabled: bool = True
    mf_epochs: int = 15
    knn_neighbours: int = 0

    def __post_init__(self) -> None:
        if self.mf_epochs < 1 or self.knn_neighbours < 0:
            raise ConfigError("[baselines] needs mf-epochs >= 1 and knn-neighbours >= 0")


@dataclass(frozen=True)
class RecSpec:
    """The recommendation task's experiment keys.

    Attributes:
        dataset: ``movielens-100k`` (one branch per US ZIP zone) or ``synthetic``.
        negatives_dir: Where the fixed negatives file of a real data set lives (default
            ``~/.cache/fedcrm``; never inside the repository).
        synthetic: Synthetic data settings (``dataset = "synthetic"``).
        baselines: The centralised baselines.
    """

    dataset: RecDataset
    negatives_dir: str = ""
    synthetic: SyntheticRecConfig = field(default_factory=SyntheticRecConfig)
    baselines: RecBaselines = field(default_factory=RecBaselines)


def default_negatives_dir() -> Path:
    """``$XDG_CACHE_HOME/fedcrm`` (default ``~/.cache/fedcrm``): outside the repository."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedcrm"


def synthetic_rec_data(cfg: SyntheticRecConfig, *, seed: int) -> RecData:
    """Group-structured synthetic interactions, users spread over branches in uneven shares.

    Branch ``b`` gets a share proportional to ``b + 1``; every branch gets at least one user.
    ``cold_customers`` users per branch with no history are appended (``c<branch>-<j>``).
    """
    log = synthetic_interactions(
        cfg.users,
        cfg.items,
        seed=integer(seed, Stream.SYNTHETIC),
        n_groups=cfg.groups,
        per_user=(cfg.min_per_user, cfg.max_per_user),
    )
    rng = generator(seed, Stream.SYNTHETIC, 1)  # which branch each user belongs to
    weights = np.arange(1, cfg.branches + 1, dtype=np.float64)
    branch = rng.choice(cfg.branches, size=cfg.users, p=weights / weights.sum())
    branch[: cfg.branches] = np.arange(cfg.branches)
    cold = np.repeat(np.arange(cfg.branches), cfg.cold_customers)
    user_ids = tuple(f"u{u}" for u in range(cfg.users)) + tuple(
        f"c{b}-{j}" for b in range(cfg.branches) for j in range(cfg.cold_customers)
    )
    log = Interactions(log.user, log.item, log.timestamp, len(user_ids), log.n_items)
    return RecData(
        interactions=log,
        user_ids=user_ids,
        item_ids=tuple(f"i{i}" for i in range(cfg.items)),
        user_branch=np.concatenate([branch, cold]).astype(np.int64),
        branches=tuple(make_branch(b) for b in range(cfg.branches)),
    )


@functools.lru_cache(maxsize=4)
def experiment_data(spec: RecSpec, seed: int) -> tuple[RecData, LeaveOneOutSplit, SampledNegatives]:
    """The experiment's data set, its leave-one-out split and fixed negatives (memoised).

    Real data: the negatives are sampled once per seed and kept in a file (`negatives_dir`).
    """
    if spec.dataset == "synthetic":
        data = synthetic_rec_data(spec.synthetic, seed=seed)
        split = leave_one_out(data.interactions)
        return data, split, sample_negatives(split, seed=seed)
    data = load_movielens_100k()
    split = leave_one_out(data.interactions)
    directory = Path(spec.negatives_dir) if spec.negatives_dir else default_negatives_dir()
    negatives = load_or_sample_negatives(directory, split, seed=seed, name=spec.dataset)
    return data, split, negatives


@functools.lru_cache(maxsize=4)
def branch_views(spec: RecSpec, seed: int) -> tuple[BranchView, ...]:
    """Every branch's view of the experiment's data, in branch order (memoised per process).

    Flower's Ray backend ships the ClientApp with every message; this per-process memo lets a
    long-lived Ray worker prepare the split once instead of once per message.
    """
    data, split, negatives = experiment_data(spec, seed)
    return tuple(branch_view(data, split, negatives, b.branch_id) for b in data.branches)


@dataclass(frozen=True)
class RecSimulation:
    """How a simulated branch finds its share: the experiment's data spec and seed."""

    spec: RecSpec
    seed: int


@dataclass(frozen=True)
class RecBranch:
    """What one branch holds: its customers' pseudonyms, split and sampled negatives.

    Attributes:
        customers: The pseudonym of each local user (local index = position).
        split: The branch's split, with local user indices and the shared item catalogue.
        negatives: The branch's sampled negatives, aligned with ``split.eval_users``.
    """

    customers: tuple[str, ...]
    split: LeaveOneOutSplit
    negatives: SampledNegatives

    @property
    def num_examples(self) -> int:
        """Training interactions."""
        return len(self.split.train)

    def subjects(self) -> dict[str, list[str]]:
        """The customers trained on (with interactions) and evaluated (validation and test)."""
        trained = np.unique(self.split.train.user)
        evaluated = [self.customers[int(u)] for u in self.split.eval_users]
        return {
            "train": [self.customers[int(u)] for u in trained],
            "val": evaluated,
            "test": list(evaluated),
        }

    def keep(self, kept: set[str]) -> "RecBranch":
        """The data of the customers in ``kept`` only; local indices (user factors) unchanged."""
        mask = np.array([c in kept for c in self.customers], dtype=bool)
        return RecBranch(
            self.customers, self.split.keep_users(mask), self.negatives.keep_users(mask)
        )


UNKNOWN_PARTITION: Final = "partition-id {partition} has no branch: the data has {count} branches"


def simulated_branch(handle: RecSimulation, partition: int, key: bytes | None) -> RecBranch:
    """Simulated branch ``partition``'s share of the experiment's data.

    Raises:
        ConfigError: The partition id names no branch.
    """
    views = branch_views(handle.spec, handle.seed)
    if not 0 <= partition < len(views):
        raise ConfigError(UNKNOWN_PARTITION.format(partition=partition, count=len(views)))
    view = views[partition]
    data, _, _ = experiment_data(handle.spec, handle.seed)
    raw = pd.Series([data.user_ids[int(u)] for u in view.global_users], dtype=str)
    customers = tuple(pseudonymise_series(raw, key)) if key is not None else tuple(raw)
    return RecBranch(customers, view.split, view.negatives)


def deployed_branch(
    export: Path, catalogue: Path, *, key: bytes | None, num_items: int, seed: int
) -> RecBranch:
    """A deployed branch's interactions, split leave-one-out and its negatives sampled locally.

    Raises:
        DataError: The catalogue does not have the federation's ``num_items`` items, or the
            export is unusable (every problem listed).
    """
    items = read_catalogue(catalogue)
    if num_items and len(items) != num_items:
        raise DataError(
            f"{catalogue}: the catalogue has {len(items)} items, the federation {num_items}; "
            "install the coordinator's current catalogue"
        )
    log, customers = read_interaction_export(export, items, key)
    split = leave_one_out(log)
    return RecBranch(customers, split, sample_negatives(split, seed=seed))
