import stat
from pathlib import Path

import pandas as pd
import pytest

from fedcrm.data.loaders import load_branch_export
from fedcrm.data.pseudonymise import load_or_create_key, pseudonymise, pseudonymise_series
from fedcrm.data.schema import MLC
from fedcrm.data.synthetic import synthetic_export

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


def test_stable_and_keyed() -> None:
    assert pseudonymise("cust-1", KEY_A) == pseudonymise("cust-1", KEY_A)
    assert pseudonymise("cust-1", KEY_A) != pseudonymise("cust-2", KEY_A)
    assert pseudonymise("cust-1", KEY_A) != pseudonymise("cust-1", KEY_B)
    assert "cust-1" not in pseudonymise("cust-1", KEY_A)


def test_short_key_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        pseudonymise("x", b"short")


def test_series() -> None:
    out = pseudonymise_series(pd.Series(["a", "b", "a"]), KEY_A)
    assert out.iloc[0] == out.iloc[2] != out.iloc[1]


def test_key_file_created_private_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "branch" / "hmac.key"
    key = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == key
    path.write_bytes(b"truncated")
    with pytest.raises(ValueError, match="expected a 32-byte key"):
        load_or_create_key(path)


def test_branch_export_loader_never_returns_raw_ids(tmp_path: Path) -> None:
    export = synthetic_export(MLC, 20, seed=4)
    path = tmp_path / "export.csv"
    export.to_csv(path, index=False)
    frame = load_branch_export(path, MLC, KEY_A)
    raw = set(export["customer_id"])
    assert raw.isdisjoint(frame["customer_id"])
    assert all(v.startswith("p_") for v in frame["customer_id"])
