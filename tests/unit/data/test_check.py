from pathlib import Path

import pandas as pd
import pytest

from fedcrm.data.check import coerce_frame, read_export, validate_frame
from fedcrm.data.schema import MLC, TELCO
from fedcrm.data.synthetic import synthetic_export
from fedcrm.exceptions import SchemaViolation


@pytest.fixture
def export() -> pd.DataFrame:
    return synthetic_export(MLC, 50, seed=1)


def test_synthetic_export_is_valid(export: pd.DataFrame) -> None:
    assert validate_frame(export, MLC) == []
    assert validate_frame(synthetic_export(TELCO, 50, seed=2), TELCO) == []


def test_every_problem_is_reported_at_once(export: pd.DataFrame) -> None:
    bad = export.astype(object).drop(columns=["total_day_calls"]).assign(loyalty_score=1)
    bad.loc[3, "account_length"] = "twelve"
    bad.loc[4, "international_plan"] = "maybe"
    bad.loc[5, "churn"] = None
    bad.loc[6, "churn"] = "perhaps"
    bad.loc[7, "customer_id"] = bad.loc[8, "customer_id"]
    bad.loc[9, "number_vmail_messages"] = None
    problems = validate_frame(bad, MLC)
    text = "\n".join(problems)
    assert len(problems) == 8, text
    assert "missing column(s) ['total_day_calls']" in text
    assert "unexpected column(s) ['loyalty_score']" in text
    assert "account_length: expected a number, found ['twelve'] in row(s) 4" in text
    assert "international_plan: unknown categor(y/ies) ['maybe'] in row(s) 5" in text
    assert "churn: missing label in row(s) 6" in text
    assert "unknown label value(s) ['perhaps']" in text
    assert "appear more than once, row(s) 8, 9" in text
    assert "number_vmail_messages: missing value in row(s) 10" in text


def test_binary_column_must_be_zero_or_one() -> None:
    frame = synthetic_export(TELCO, 10, seed=0)
    frame.loc[2, "partner"] = 2
    assert validate_frame(frame, TELCO) == ["partner: expected 0 or 1, found ['2'] in row(s) 3"]


def test_nullable_numeric_accepts_blanks() -> None:
    frame = synthetic_export(TELCO, 10, seed=0)
    frame.loc[0, "total_charges"] = None
    assert validate_frame(frame, TELCO) == []
    assert coerce_frame(frame, TELCO)["total_charges"].isna().sum() == 1


def test_coerce_raises_with_all_problems(export: pd.DataFrame) -> None:
    with pytest.raises(SchemaViolation) as info:
        coerce_frame(export.drop(columns=["churn", "state"]).assign(x=1), MLC)
    assert len(info.value.problems) == 2


def test_csv_round_trip(tmp_path: Path, export: pd.DataFrame) -> None:
    path = tmp_path / "export.csv"
    export.to_csv(path, index=False)
    frame = coerce_frame(read_export(path), MLC)
    assert len(frame) == 50
    assert set(frame["churn"]) <= {0, 1}


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(SchemaViolation, match="empty"):
        read_export(path)


def test_header_only_file(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text(",".join(MLC.columns) + "\n")
    assert validate_frame(read_export(path), MLC) == [
        "the table has no rows; export at least one customer"
    ]


def test_wrong_encoding(tmp_path: Path, export: pd.DataFrame) -> None:
    path = tmp_path / "latin1.csv"
    export.assign(state="Québec").to_csv(path, index=False, encoding="latin-1")
    with pytest.raises(SchemaViolation, match=r"not UTF-8.*re-export"):
        read_export(path)


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "export.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(Exception, match="unsupported file type"):
        read_export(path)
