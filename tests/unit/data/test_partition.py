import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrm.data.check import coerce_frame
from fedcrm.data.partition import CENSUS_REGIONS, PartitionKind, partition_indices
from fedcrm.data.schema import MLC
from fedcrm.data.synthetic import synthetic_export
from fedcrm.exceptions import ConfigError


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return coerce_frame(synthetic_export(MLC, 800, seed=3), MLC)


def _assert_cover(parts: list, n: int) -> None:
    rows = np.concatenate([p.indices for p in parts])
    assert len(rows) == n
    assert len(np.unique(rows)) == n


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (PartitionKind.NATURAL, None),
        (PartitionKind.REGION, 4),
        (PartitionKind.DIRICHLET, 6),
        (PartitionKind.IID, 6),
    ],
    ids=["natural", "region", "dirichlet", "iid"],
)
def test_disjoint_complete_deterministic(
    frame: pd.DataFrame, kind: PartitionKind, expected: int | None
) -> None:
    a = partition_indices(frame, kind=kind, num_branches=6, seed=7, min_branch_size=20)
    b = partition_indices(frame, kind=kind, num_branches=6, seed=7, min_branch_size=20)
    _assert_cover(a, len(frame))
    assert [p.branch for p in a] == [p.branch for p in b]
    assert all(np.array_equal(x.indices, y.indices) for x, y in zip(a, b, strict=True))
    if expected is not None:
        assert len(a) == expected
    else:
        assert len(a) == frame["state"].nunique()


def test_natural_branches_hold_one_state(frame: pd.DataFrame) -> None:
    for part in partition_indices(frame, kind=PartitionKind.NATURAL):
        assert set(frame["state"].iloc[part.indices]) == {part.branch}


def test_region_branches_follow_census_regions(frame: pd.DataFrame) -> None:
    for part in partition_indices(frame, kind=PartitionKind.REGION):
        assert set(frame["state"].iloc[part.indices]) <= set(CENSUS_REGIONS[part.branch])


def test_dirichlet_skews_labels(frame: pd.DataFrame) -> None:
    parts = partition_indices(
        frame, kind=PartitionKind.DIRICHLET, num_branches=5, alpha=0.1, seed=1, min_branch_size=10
    )
    shares = [frame["churn"].iloc[p.indices].mean() for p in parts]
    assert max(shares) - min(shares) > 0.3


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 12))
def test_iid_seeds_change_assignment_but_not_cover(frame: pd.DataFrame, seed: int, n: int) -> None:
    parts = partition_indices(frame, kind=PartitionKind.IID, num_branches=n, seed=seed)
    _assert_cover(parts, len(frame))
    sizes = [len(p.indices) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_bad_settings(frame: pd.DataFrame) -> None:
    with pytest.raises(ConfigError, match="alpha"):
        partition_indices(frame, kind=PartitionKind.DIRICHLET, alpha=0)
    with pytest.raises(ConfigError, match="column 'region'"):
        partition_indices(frame, kind=PartitionKind.NATURAL, column="region")
    with pytest.raises(ConfigError, match="no census region"):
        partition_indices(frame.assign(state="ZZ"), kind=PartitionKind.REGION)
