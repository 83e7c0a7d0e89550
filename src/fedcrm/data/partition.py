"""Split a data set into virtual branches: natural (region), Dirichlet label skew, or IID.

Flower Datasets' partitioners do the splitting; they run offline on a Hugging Face
``datasets.Dataset`` built from the in-memory frame (``HF_DATASETS_OFFLINE=1`` is set by
`fedcrm._env`). Every partitioner here is deterministic for a seed, and the partitions are
disjoint and cover every row (checked by `partition_indices` before it returns). Flower
Datasets and ``datasets`` load only when a simulation partitions data (their import costs over
a second, and no branch process needs them).
"""

import logging
import warnings
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from fedcrm.exceptions import ConfigError
from fedcrm.seeds import Stream, generator, integer

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

_ROW = "__row__"

# US Census Bureau regions (https://www2.census.gov/geo/pdfs/maps-data/maps/reference/us_regdiv.pdf).
_NORTHEAST = ("CT", "ME", "MA", "NH", "RI", "VT", "NJ", "NY", "PA")
_MIDWEST = ("IL", "IN", "MI", "OH", "WI", "IA", "KS", "MN", "MO", "NE", "ND", "SD")
_SOUTH = ("DE", "DC", "FL", "GA", "MD", "NC", "SC", "VA", "WV", "AL", "KY", "MS", "TN")
_SOUTH_WEST_CENTRAL = ("AR", "LA", "OK", "TX")
_WEST = ("AZ", "CO", "ID", "MT", "NV", "NM", "UT", "WY", "AK", "CA", "HI", "OR", "WA")
CENSUS_REGIONS: dict[str, tuple[str, ...]] = {
    "northeast": _NORTHEAST,
    "midwest": _MIDWEST,
    "south": _SOUTH + _SOUTH_WEST_CENTRAL,
    "west": _WEST,
}
STATE_TO_REGION = {s: r for r, states in CENSUS_REGIONS.items() for s in states}


class PartitionKind(StrEnum):
    """How rows are assigned to branches."""

    NATURAL = "natural"
    """One branch per value of a column (e.g. US state)."""
    REGION = "region"
    """One branch per US census region of the ``state`` column (4 branches)."""
    DIRICHLET = "dirichlet"
    """Label skew: each branch's churn share drawn from Dirichlet(alpha)."""
    IID = "iid"
    """Uniformly random, equal-sized branches."""


@dataclass(frozen=True)
class Partition:
    """Row indices of one branch and its display name."""

    branch: str
    indices: np.ndarray


def _dataset(frame: pd.DataFrame, columns: list[str]) -> "Dataset":
    from datasets import Dataset

    data = frame[columns].reset_index(drop=True).copy()
    data[_ROW] = np.arange(len(data))
    return Dataset.from_pandas(data, preserve_index=False)


def partition_indices(
    frame: pd.DataFrame,
    *,
    kind: PartitionKind,
    num_branches: int = 10,
    column: str = "state",
    label: str = "churn",
    alpha: float = 0.5,
    min_branch_size: int = 30,
    seed: int = 42,
) -> list[Partition]:
    """Assign every row of ``frame`` to exactly one branch.

    Args:
        frame: The pooled data (only the simulation's researcher ever holds it).
        kind: Partitioning scheme.
        num_branches: Branch count for ``dirichlet`` and ``iid``.
        column: Column that names the branch for ``natural`` (and ``state`` for ``region``).
        label: Label column for ``dirichlet``.
        alpha: Dirichlet concentration; smaller means more label skew.
        min_branch_size: Dirichlet resamples until every branch has at least this many rows.
        seed: The run's seed; the partition draws from its own stream (`fedcrm.seeds`).

    Returns:
        Partitions ordered by branch name (natural, region) or branch number.

    Raises:
        ConfigError: Impossible settings (unknown column, too few rows, bad alpha).
    """
    if kind in (PartitionKind.DIRICHLET, PartitionKind.IID) and num_branches < 1:
        raise ConfigError(f"num_branches must be >= 1, got {num_branches}")
    if kind is PartitionKind.DIRICHLET and alpha <= 0:
        raise ConfigError(f"dirichlet alpha must be > 0, got {alpha}")
    if kind in (PartitionKind.NATURAL, PartitionKind.REGION) and column not in frame.columns:
        raise ConfigError(f"natural partitioning needs column {column!r}, which the data lacks")

    if kind is PartitionKind.REGION:
        regions = frame[column].map(STATE_TO_REGION)
        if regions.isna().any():
            unknown = sorted(set(frame.loc[regions.isna(), column]))
            raise ConfigError(f"no census region for state code(s) {unknown}")
        work = frame.assign(**{column: regions})
        kind_eff = PartitionKind.NATURAL
    else:
        work, kind_eff = frame, kind

    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if kind_eff is PartitionKind.NATURAL:
        parts = _natural(work, column)
    else:
        if len(frame) < num_branches:
            raise ConfigError(f"{len(frame)} rows cannot fill {num_branches} branches")
        if kind_eff is PartitionKind.DIRICHLET:
            dirichlet = DirichletPartitioner(
                num_partitions=num_branches,
                partition_by=label,
                alpha=alpha,
                min_partition_size=min_branch_size,
                self_balancing=True,
                seed=integer(seed, Stream.PARTITION),
            )
            parts = _numbered(dirichlet, frame, label, np.arange(len(frame)))
        else:
            # IidPartitioner cuts contiguous shards: shuffle first, then map rows back.
            order = generator(seed, Stream.PARTITION).permutation(len(frame))
            iid = IidPartitioner(num_partitions=num_branches)
            parts = _numbered(iid, frame.iloc[order], label, order)

    _check_cover(parts, len(frame))
    return parts


def _natural(frame: pd.DataFrame, column: str) -> list[Partition]:
    from flwr_datasets.partitioner import NaturalIdPartitioner

    partitioner = NaturalIdPartitioner(partition_by=column)
    partitioner.dataset = _dataset(frame, [column])
    rows = [
        np.asarray(partitioner.load_partition(pid)[_ROW], dtype=np.int64)
        for pid in range(partitioner.num_partitions)
    ]
    names = partitioner.partition_id_to_natural_id
    return sorted(
        (Partition(str(names[pid]), r) for pid, r in enumerate(rows)), key=lambda p: p.branch
    )


def _numbered(
    partitioner: Any,
    frame: pd.DataFrame,
    label: str,
    original_rows: np.ndarray,
) -> list[Partition]:
    partitioner.dataset = _dataset(frame, [label])
    parts = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for pid in range(partitioner.num_partitions):
            rows = np.asarray(partitioner.load_partition(pid)[_ROW], dtype=np.int64)
            parts.append(Partition(f"branch-{pid:02d}", np.sort(original_rows[rows])))
    for w in caught:  # Dirichlet resampling notices: informative, not errors
        logger.info("flwr-datasets: %s", w.message)
    return parts


def _check_cover(parts: list[Partition], n: int) -> None:
    allrows = np.concatenate([p.indices for p in parts]) if parts else np.array([], dtype=np.int64)
    if len(allrows) != n or len(np.unique(allrows)) != n:
        raise RuntimeError("partitions are not disjoint and complete; this is a bug")
