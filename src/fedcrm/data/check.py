"""Validate a branch's CRM export against a declared schema, reporting every problem at once."""

from pathlib import Path

import pandas as pd

from fedcrm.data.schema import ChurnSchema, FeatureKind
from fedcrm.exceptions import DataError, SchemaViolation

_MAX_EXAMPLES = 5


def name_rows(mask: "pd.Series[bool]") -> str:
    """Name the first few offending rows (1-based data rows, header excluded)."""
    idx = [int(i) + 1 for i in mask[mask].index[:_MAX_EXAMPLES]]
    more = int(mask.sum()) - len(idx)
    return ", ".join(map(str, idx)) + (f" and {more} more" if more > 0 else "")


def read_export(path: Path) -> pd.DataFrame:
    """Read a branch export (CSV or Parquet) as strings-or-numbers, exactly as stored.

    Args:
        path: A ``.csv`` (UTF-8, comma-separated, header row) or ``.parquet`` file.

    Raises:
        DataError: The file is missing, has an unsupported extension, is not UTF-8, or cannot
            be parsed; the message says how to fix it.
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise SchemaViolation([f"{path.name}: the file is empty; export the table with a header"])
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, encoding="utf-8", dtype=str, keep_default_na=False)
            # Everything is read as text so that types are checked here, not guessed by pandas.
            return frame.replace({"": None})
        if suffix in {".parquet", ".pq"}:
            return pd.read_parquet(path)
    except UnicodeDecodeError as exc:
        raise SchemaViolation(
            [
                f"{path.name}: not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset "
                f"{exc.start}); re-export the file with UTF-8 encoding"
            ]
        ) from exc
    except pd.errors.EmptyDataError as exc:
        raise SchemaViolation([f"{path.name}: the file is empty; export it with a header"]) from exc
    except (pd.errors.ParserError, OSError, ValueError) as exc:
        raise DataError(f"{path.name}: cannot be parsed as {suffix[1:]}: {exc}") from exc
    raise DataError(f"{path.name}: unsupported file type {suffix!r}; use .csv or .parquet")


def validate_frame(frame: pd.DataFrame, schema: ChurnSchema) -> list[str]:
    """Return every way ``frame`` violates ``schema`` (empty when it is valid).

    Each problem names the column, the offending rows and what to change.
    """
    problems: list[str] = []
    if frame.empty:
        return ["the table has no rows; export at least one customer"]

    allowed = set(schema.columns) | ({schema.region_column} if schema.region_column else set())
    missing = [c for c in schema.columns if c not in frame.columns]
    extra = [c for c in frame.columns if c not in allowed]
    if missing:
        problems.append(
            f"missing column(s) {missing}: add them with the names of schema {schema.name!r}"
        )
    if extra:
        problems.append(
            f"unexpected column(s) {extra}: remove them or rename them to the schema's names "
            f"(expected {list(schema.columns)})"
        )

    if schema.id_column in frame.columns:
        ids = frame[schema.id_column]
        if ids.isna().any():
            problems.append(
                f"{schema.id_column}: empty customer id in row(s) {name_rows(ids.isna())}"
            )
        dup = ids.duplicated(keep=False) & ids.notna()
        if dup.any():
            problems.append(
                f"{schema.id_column}: {int(ids[dup].nunique())} customer id(s) appear more than "
                f"once, row(s) {name_rows(dup)}; a churn export has one row per customer"
            )

    if schema.label in frame.columns:
        label = frame[schema.label].astype("string")
        if label.isna().any():
            problems.append(f"{schema.label}: missing label in row(s) {name_rows(label.isna())}")
        bad = label.notna() & ~label.isin(schema.label_values)
        if bad.any():
            found = sorted(set(label[bad].dropna()))[:_MAX_EXAMPLES]
            problems.append(
                f"{schema.label}: unknown label value(s) {found} in row(s) {name_rows(bad)}; "
                f"use {list(schema.label_values)}"
            )

    for feature in schema.features:
        if feature.name not in frame.columns:
            continue
        col = frame[feature.name]
        if feature.kind is FeatureKind.NUMERIC:
            values = pd.to_numeric(col, errors="coerce")
            bad = col.notna() & values.isna()
            if bad.any():
                found = sorted({str(v) for v in col[bad]})[:_MAX_EXAMPLES]
                problems.append(
                    f"{feature.name}: expected a number, found {found} in row(s) {name_rows(bad)}"
                )
            if not feature.nullable and col.isna().any():
                problems.append(
                    f"{feature.name}: missing value in row(s) {name_rows(col.isna())}; "
                    "this column may not be empty"
                )
        elif feature.kind is FeatureKind.BINARY:
            text = col.astype("string")
            bad = ~text.isin(["0", "1"])
            if bad.any():
                found = sorted({str(v) for v in col[bad]})[:_MAX_EXAMPLES]
                problems.append(
                    f"{feature.name}: expected 0 or 1, found {found} in row(s) {name_rows(bad)}"
                )
        else:
            text = col.astype("string")
            bad = ~text.isin(feature.categories)
            if bad.any():
                found = sorted({str(v) for v in col[bad]})[:_MAX_EXAMPLES]
                problems.append(
                    f"{feature.name}: unknown categor(y/ies) {found} in row(s) {name_rows(bad)}; "
                    f"allowed: {list(feature.categories)}"
                )
    return problems


def coerce_frame(frame: pd.DataFrame, schema: ChurnSchema) -> pd.DataFrame:
    """Return a validated copy with typed columns: floats, 0/1 ints and category strings.

    Raises:
        SchemaViolation: ``frame`` does not satisfy ``schema`` (all problems listed).
    """
    problems = validate_frame(frame, schema)
    if problems:
        raise SchemaViolation(problems)
    out = pd.DataFrame(index=frame.index)
    out[schema.id_column] = frame[schema.id_column].astype(str)
    if schema.region_column and schema.region_column in frame.columns:
        out[schema.region_column] = frame[schema.region_column].astype(str)
    for feature in schema.features:
        col = frame[feature.name]
        if feature.kind is FeatureKind.NUMERIC:
            out[feature.name] = pd.to_numeric(col, errors="raise").astype("float64")
        elif feature.kind is FeatureKind.BINARY:
            out[feature.name] = col.astype("string").astype(int)
        else:
            out[feature.name] = col.astype(str)
    out[schema.label] = (frame[schema.label].astype(str) == schema.label_values[1]).astype(int)
    return out.reset_index(drop=True)
