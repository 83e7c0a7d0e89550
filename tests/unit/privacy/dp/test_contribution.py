"""Contribution bounding before DP-SGD: at most ``cap`` rows per customer."""

import numpy as np
import pandas as pd
import pytest

from fedcrm.exceptions import DataError
from fedcrm.privacy.dp import cap_rows_per_customer


@pytest.fixture
def visits() -> pd.DataFrame:
    customers = ["a"] * 5 + ["b"] * 1 + ["c"] * 3 + ["d"] * 2
    return pd.DataFrame({"customer": customers, "amount": np.arange(len(customers))})


def test_cap_rows_per_customer_bounds_repeated_customers(visits: pd.DataFrame) -> None:
    capped, report = cap_rows_per_customer(visits, "customer", 2, seed=1)
    assert capped["customer"].value_counts().max() <= 2
    assert capped["customer"].value_counts().to_dict() == {"a": 2, "c": 2, "d": 2, "b": 1}
    assert list(capped.index) == sorted(capped.index)  # original order kept
    assert (report.rows_before, report.rows_after, report.rows_dropped) == (11, 7, 4)
    assert (report.customers, report.customers_capped, report.cap) == (4, 2, 2)
    again, _ = cap_rows_per_customer(visits, "customer", 2, seed=1)
    pd.testing.assert_frame_equal(capped, again)
    unique, unique_report = cap_rows_per_customer(visits.drop_duplicates("customer"), "customer", 1)
    assert unique_report.rows_dropped == 0 and len(unique) == 4


def test_cap_rows_per_customer_rejects_bad_input(visits: pd.DataFrame) -> None:
    with pytest.raises(DataError, match="not found"):
        cap_rows_per_customer(visits, "client", 2)
    with pytest.raises(DataError, match="cap must be an integer >= 1"):
        cap_rows_per_customer(visits, "customer", 0)
    broken = visits.astype({"customer": object})
    broken.loc[0, "customer"] = None
    with pytest.raises(DataError, match="1 row\\(s\\) have no 'customer'"):
        cap_rows_per_customer(broken, "customer", 2)
