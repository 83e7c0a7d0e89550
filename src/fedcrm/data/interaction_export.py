"""A deployed branch's interaction export and the federation's shared item catalogue.

A recommendation branch exports its interactions as CSV or Parquet with the columns
``customer_id``, ``item_id`` and ``timestamp`` (an integer: seconds since the epoch, or any
ordered integer); the catalogue is a text file of item ids, one per line, in the federation's
item order (every branch and the coordinator hold the same file). Customer ids are
pseudonymised with the branch's key on load, as churn exports are.
"""

from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd

from fedcrm.data.check import name_rows, read_export
from fedcrm.data.interactions import Interactions
from fedcrm.data.pseudonymise import pseudonymise_series
from fedcrm.exceptions import DataError, SchemaViolation

COLUMNS: Final = ("customer_id", "item_id", "timestamp")
_EXAMPLES: Final = 5


def read_catalogue(path: Path) -> tuple[str, ...]:
    """The shared item catalogue: one item id per line, in index order.

    Raises:
        DataError: The file is missing, empty, or repeats an item id.
    """
    if not path.is_file():
        raise DataError(f"{path}: no such catalogue file (node config catalogue-path)")
    items = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    items = tuple(item for item in items if item)
    if not items:
        raise DataError(f"{path}: the catalogue is empty; write one item id per line")
    if len(set(items)) != len(items):
        raise DataError(f"{path}: the catalogue repeats item ids; each must appear once")
    return items


def write_catalogue(path: Path, items: tuple[str, ...] | list[str]) -> None:
    """Write a catalogue `read_catalogue` reads back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{item}\n" for item in items), encoding="utf-8")


def write_interaction_export(path: Path, frame: pd.DataFrame) -> None:
    """Write an export (``customer_id``, ``item_id``, ``timestamp``) as CSV or Parquet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = frame.loc[:, list(COLUMNS)]
    if path.suffix.lower() == ".csv":
        out.to_csv(path, index=False)
    else:
        out.to_parquet(path, index=False)


def read_interaction_export(
    path: Path, catalogue: tuple[str, ...], key: bytes | None
) -> tuple[Interactions, tuple[str, ...]]:
    """Read a branch's interactions, with its customers as local indices ``0..n-1``.

    Args:
        path: The export (``.csv`` or ``.parquet``).
        catalogue: The shared item ids, in index order.
        key: The branch's HMAC key (``None``: the ids are pseudonyms already).

    Returns:
        The log (customers numbered in the order of their sorted pseudonyms) and the
        pseudonym of each local customer.

    Raises:
        SchemaViolation: Every problem of the export at once (columns, ids, items, times).
        DataError: The file cannot be read.
    """
    frame = read_export(path)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise SchemaViolation(
            [f"missing column(s) {missing}; an interaction export has columns {list(COLUMNS)}"]
        )
    problems: list[str] = []
    ids = frame["customer_id"]
    if ids.isna().any():
        problems.append(f"customer_id: missing in row(s) {name_rows(ids.isna())}")
    index = {item: i for i, item in enumerate(catalogue)}
    items = frame["item_id"].astype(str).map(index)
    unknown = items.isna()
    if unknown.any():
        names = sorted(set(frame.loc[unknown, "item_id"].astype(str)))[:_EXAMPLES]
        problems.append(
            f"item_id: {int(unknown.sum())} row(s) name items outside the shared catalogue "
            f"(e.g. {names}), row(s) {name_rows(unknown)}; update the catalogue or drop them"
        )
    stamps = pd.to_numeric(frame["timestamp"], errors="coerce")
    bad_time = stamps.isna() | (stamps % 1 != 0)
    if bad_time.any():
        problems.append(f"timestamp: expected a whole number in row(s) {name_rows(bad_time)}")
    if problems:
        raise SchemaViolation(problems)
    raw = ids.astype(str)
    pseudonyms = pseudonymise_series(raw, key) if key is not None else raw
    customers = tuple(sorted(set(pseudonyms)))
    local = {c: i for i, c in enumerate(customers)}
    log = Interactions.from_arrays(
        pseudonyms.map(local).to_numpy(dtype=np.int64),
        items.to_numpy(dtype=np.int64),
        stamps.to_numpy(dtype=np.int64),
        n_users=len(customers),
        n_items=len(catalogue),
    )
    return log, customers
