"""``fedcrm compliance``: API keys, consent import (exit codes, bad rows), withdraw, receipt."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fedcrm.compliance import ApiKeyStore, ConsentRegistry, Notice, open_store, sqlite_url
from fedcrm.compliance.cli import app

NOTICE = Notice.from_text("n", "v1", "text")
HEADER = (
    "customer_id,purpose,status,legal_basis,occurred_at,notice_id,notice_version,notice_hash,"
    "channel\n"
)


def _row(customer: str, at: str = "2026-01-01T00:00:00Z") -> str:
    return f"{customer},churn-model-training,given,consent,{at},n,v1,{NOTICE.sha256},web\n"


def test_apikey_create_prints_the_token_once(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    result = CliRunner().invoke(
        app, ["apikey", "create", "--role", "branch", "--branch", "b1", "--label", "x", "--db", db]
    )
    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[-1]
    principal = ApiKeyStore(open_store(sqlite_url(db))).authenticate(token)
    assert principal is not None
    assert principal.branch == "b1"
    listed = CliRunner().invoke(app, ["apikey", "list", "--db", db])
    assert token not in listed.output
    refused = CliRunner().invoke(app, ["apikey", "create", "--role", "branch", "--label", "x"])
    assert refused.exit_code == 2


def test_consent_import_withdraw_and_receipt(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + _row("p_1") + _row("bad id") + _row("p_3", "soon"), encoding="utf-8")
    result = CliRunner().invoke(app, ["consent", "import", "b1", str(bad), "--db", db])
    assert result.exit_code == 1
    assert "line 3" in result.stderr
    assert "line 4" in result.stderr
    assert "nothing imported" in result.stderr

    good = tmp_path / "good.csv"
    good.write_text(HEADER + _row("p_1") + _row("p_2"), encoding="utf-8")
    result = CliRunner().invoke(app, ["consent", "import", "b1", str(good), "--db", db])
    assert result.exit_code == 0, result.output
    assert "imported 2 row(s)" in result.stdout

    result = CliRunner().invoke(app, ["consent", "withdraw", "b1", "p_1", "--db", db])
    assert result.exit_code == 0, result.output
    assert "churn-model-training" in result.stdout
    again = CliRunner().invoke(app, ["consent", "withdraw", "b1", "p_1", "--db", db])
    assert again.exit_code == 1

    out = tmp_path / "receipt.json"
    result = CliRunner().invoke(
        app, ["consent", "receipt", "b1", "p_1", "--db", db, "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    receipt = json.loads(out.read_text(encoding="utf-8"))
    assert [h["event"] for h in receipt["history"]] == ["given", "withdrawn"]
    registry = ConsentRegistry(open_store(sqlite_url(db)))
    assert registry.valid_for("b1", "churn-model-training") == {"p_2"}
    missing = CliRunner().invoke(app, ["consent", "receipt", "b1", "p_9", "--db", db])
    assert missing.exit_code == 1
