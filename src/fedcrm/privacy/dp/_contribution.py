"""Contribution bounding before DP-SGD: at most ``cap`` rows per customer.

DP-SGD protects one row; a customer with k rows is protected only by group privacy over k rows,
so bound k first and record the cap with the run. See docs/privacy-analysis.md#privacy-unit.
"""

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedcrm.exceptions import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CapReport:
    """What :func:`cap_rows_per_customer` did (aggregate counts only, no identifiers).

    Attributes:
        cap: Maximum rows kept per customer.
        rows_before: Rows in the input.
        rows_after: Rows kept.
        customers: Distinct customers.
        customers_capped: Customers who had more than ``cap`` rows.
    """

    cap: int
    rows_before: int
    rows_after: int
    customers: int
    customers_capped: int

    @property
    def rows_dropped(self) -> int:
        """Rows removed by the cap."""
        return self.rows_before - self.rows_after


def cap_rows_per_customer(
    frame: pd.DataFrame, id_column: str, cap: int, seed: int | None = None
) -> tuple[pd.DataFrame, CapReport]:
    """Keep at most ``cap`` rows per customer, chosen uniformly at random, before DP-SGD.

    DP-SGD protects one row. When a customer has k rows, the guarantee for that customer is
    only the group-privacy bound for k rows, so bound k first and record the cap with the run.
    Churn tables have one row per customer: record-level DP is already customer-level DP there
    and no cap is needed (``cap=1`` changes nothing). The cap is data-independent; the choice
    of rows does not depend on their content, and rows keep their original order.

    Args:
        frame: Rows of the branch, with a customer identifier (pseudonymised) column.
        id_column: Name of that column.
        cap: Maximum rows per customer, >= 1.
        seed: Seed of the row choice (``None``: fresh OS randomness).

    Returns:
        The capped frame (original order) and a report of counts.

    Raises:
        DataError: The column is missing or has missing identifiers, or ``cap`` < 1.
    """
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise DataError(f"cap must be an integer >= 1, got {cap!r}")
    if id_column not in frame.columns:
        raise DataError(f"column {id_column!r} not found; cannot bound rows per customer")
    ids = frame[id_column]
    if bool(ids.isna().any()):
        raise DataError(
            f"{int(ids.isna().sum())} row(s) have no {id_column!r}; rows without a customer "
            "cannot be bounded: fix or drop them first"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(frame))
    shuffled = ids.iloc[order].reset_index(drop=True)
    rank = shuffled.groupby(shuffled, sort=False).cumcount().to_numpy()
    keep = np.sort(order[rank < cap])
    counts = ids.value_counts()
    report = CapReport(
        cap=cap,
        rows_before=len(frame),
        rows_after=len(keep),
        customers=len(counts),
        customers_capped=int((counts > cap).sum()),
    )
    logger.info(
        "contribution bound: cap %d rows/customer, %d of %d rows kept, %d customers capped",
        cap,
        report.rows_after,
        report.rows_before,
        report.customers_capped,
    )
    return frame.iloc[keep], report
