"""The branch refuses updates SecAgg+ would clip or overflow, naming itself and the round."""

import numpy as np
import pytest

from fedcrm.client.secagg_client import SecAggUpdateRefused, check_range

WHERE = "branch 3, round 2"


def test_an_update_inside_the_range_passes() -> None:
    check_range([np.full(4, 7.9)], 1000, clipping=8.0, max_weight=1000.0, where=WHERE)
    check_range([np.full(4, 15.0)], 500, clipping=8.0, max_weight=1000.0, where=WHERE)


@pytest.mark.parametrize(
    ("arrays", "count", "match"),
    [
        ([np.full(4, 8.1)], 1000, "exceeds secagg-clipping-range = 8"),
        ([np.array([1.0, np.nan])], 10, "NaN or infinite"),
        ([np.zeros(3)], 1001, "outside \\(0, secagg-max-weight = 1000\\]"),
        ([np.zeros(3)], 0, "outside"),
    ],
    ids=["clipped", "nan", "over-max-weight", "no-rows"],
)
def test_refusals_name_branch_round_and_rule(
    arrays: list[np.ndarray], count: int, match: str
) -> None:
    with pytest.raises(SecAggUpdateRefused, match=match) as info:
        check_range(arrays, count, clipping=8.0, max_weight=1000.0, where=WHERE)
    assert str(info.value).startswith(WHERE)
