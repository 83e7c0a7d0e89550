from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.data.schema import MLC
from fedcrm.data.synthetic import synthetic_export

runner = CliRunner()


def _commands() -> list[list[str]]:
    root = get_command(app)
    paths: list[list[str]] = [[]]

    def walk(cmd: object, prefix: list[str]) -> None:
        for name, sub in getattr(cmd, "commands", {}).items():
            paths.append([*prefix, name])
            walk(sub, [*prefix, name])

    walk(root, [])
    return paths


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p) or "fedcrm")
def test_every_command_has_help(path: list[str]) -> None:
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_data_check_valid_and_invalid(tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    synthetic_export(MLC, 20, seed=0).to_csv(good, index=False)
    assert runner.invoke(app, ["data", "check", str(good), "--schema", "mlc"]).exit_code == 0

    bad = tmp_path / "bad.csv"
    frame = synthetic_export(MLC, 20, seed=0).astype(object).drop(columns=["churn"])
    frame.loc[0, "voice_mail_plan"] = "sometimes"
    frame.to_csv(bad, index=False)
    result = runner.invoke(app, ["data", "check", str(bad), "--schema", "mlc"])
    assert result.exit_code == 1
    assert "missing column(s) ['churn']" in result.output
    assert "sometimes" in result.output


def test_data_check_unknown_schema(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("a\n1\n")
    result = runner.invoke(app, ["data", "check", str(path), "--schema", "bank"])
    assert result.exit_code == 2
    assert "unknown schema 'bank'" in result.output


def test_data_synth_writes_a_valid_export(tmp_path: Path) -> None:
    out = tmp_path / "s.csv"
    assert runner.invoke(app, ["data", "synth", str(out), "--rows", "15"]).exit_code == 0
    assert runner.invoke(app, ["data", "check", str(out)]).exit_code == 0


def test_simulate_reports_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('name = "x"\ndataset = "nope"\n')
    result = runner.invoke(app, ["simulate", str(cfg)])
    assert result.exit_code == 2
    assert "dataset must be one of" in result.output
