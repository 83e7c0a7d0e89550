"""The experiment TOML's ``[dp]`` table and the ``fedcrm ledger show`` command."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.compliance import LedgerEntry, PrivacyLedger, open_store, sqlite_url
from fedcrm.exceptions import ConfigError
from fedcrm.simulation.config import load_experiment, parse_experiment, to_toml_dict
from support import ledger_entry

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _raw(dp: dict[str, object], **federation: object) -> dict[str, object]:
    return {"name": "x", "dataset": "synthetic:mlc", "federation": federation, "dp": dp}


def test_dp_table_is_parsed_and_round_trips() -> None:
    cfg = parse_experiment(
        _raw({"target-epsilon": 3, "max-grad-norm": 0.5, "accountant": "prv", "purpose": "p"})
    )
    assert cfg.dp is not None
    assert (cfg.dp.target_epsilon, cfg.dp.max_grad_norm, cfg.dp.accountant) == (3, 0.5, "prv")
    assert cfg.dp.delta is None and cfg.dp.purpose == "p" and cfg.dp.model == "churn"
    assert parse_experiment(to_toml_dict(cfg)).dp == cfg.dp
    assert parse_experiment({"name": "x", "dataset": "synthetic:mlc"}).dp is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_raw({"target-epsilon": 1.0, "epsilon": 2.0}), r"\[dp\] has unknown key"),
        (_raw({"max-grad-norm": 1.0}), "needs target-epsilon"),
        (_raw({"target-epsilon": -1.0, "delta": 2.0}), "0 < delta < 1"),
        (_raw({"target-epsilon": 1.0}, strategy="fedprox"), "fedprox"),
    ],
    ids=["unknown-key", "no-target", "bad-values", "fedprox"],
)
def test_bad_dp_tables(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_experiment(raw)


@pytest.mark.parametrize("name", ["telco_dirichlet_dp.toml", "mlc_by_state_dp.toml"])
def test_dp_examples_load(name: str) -> None:
    cfg = load_experiment(EXAMPLES / name)
    assert cfg.dp is not None and cfg.dp.delta is None


def _entry(**changes: object) -> LedgerEntry:
    values: dict[str, object] = {
        "run_id": "r1",
        "branch": "CA",
        "privacy_unit": "customer",
        "noise_multiplier": 1.2,
        "sampling_rate": 0.2,
        "steps": 5,
        "delta": 0.01,
        "epsilon": 1.0,
        "cumulative_epsilon": 1.0,
        "epsilon_budget": None,
    }
    return ledger_entry(**{**values, **changes})


def test_ledger_show(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    ledger = PrivacyLedger(open_store(sqlite_url(db)))
    ledger.append(_entry())
    ledger.append(_entry(branch="NY", epsilon=0.7, cumulative_epsilon=0.7))
    ledger.append(
        _entry(round=2, steps=0, epsilon=0.9, decision="refused", reason="refused: over budget")
    )
    runner = CliRunner()
    result = runner.invoke(app, ["ledger", "show", "--db", str(db)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Cumulative ε per branch" in result.output and "refused: over budget" in result.output
    only = runner.invoke(app, ["ledger", "show", "--db", str(db), "--branch", "NY"])
    assert only.exit_code == 0 and "NY" in only.output and "CA" not in only.output
    brief = runner.invoke(app, ["ledger", "show", "--db", str(db), "--no-rounds"])
    assert brief.exit_code == 0 and "round by round" not in brief.output
    none = runner.invoke(app, ["ledger", "show", "--db", str(db), "--run", "other"])
    assert none.exit_code == 0 and "no entry" in none.output
    missing = runner.invoke(app, ["ledger", "show", "--db", str(tmp_path / "nope.db")])
    assert missing.exit_code == 2 and "no ledger" in missing.output
