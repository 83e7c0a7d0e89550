"""``fedcrm data pseudonymise``: consent files get the same pseudonyms as the training rows."""

from pathlib import Path

from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.data.pseudonymise import load_or_create_key, pseudonymise


def test_pseudonymise_matches_the_branch_key(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "hmac.key")
    source = tmp_path / "consent-raw.csv"
    source.write_text("customer_id,purpose\nC-001,churn-model-training\n007,churn-model-training\n")
    out = tmp_path / "consent.csv"
    args = ["data", "pseudonymise", str(source), str(out), "--key-path"]
    result = CliRunner().invoke(app, [*args, str(tmp_path / "hmac.key")])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[1:] == [
        f"{pseudonymise('C-001', key)},churn-model-training",
        f"{pseudonymise('007', key)},churn-model-training",  # leading zeros kept
    ]
    missing = CliRunner().invoke(app, [*args, str(tmp_path / "nokey")])
    assert missing.exit_code == 2 and not (tmp_path / "nokey").exists()
    bad = CliRunner().invoke(app, [*args, str(tmp_path / "hmac.key"), "--column", "id"])
    assert bad.exit_code == 2
