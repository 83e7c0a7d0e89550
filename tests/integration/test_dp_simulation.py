"""Record-level DP on Flower's simulation engine (Ray): ledger, replies, report, CLI.

One simulation serves every assertion (a Ray start costs ~20 s on 2 cores).
"""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.compliance import Decision, PrivacyLedger, PrivacyUnit, open_store, sqlite_url
from fedcrm.simulation.config import parse_experiment
from fedcrm.simulation.runner import run_experiment

pytestmark = [
    pytest.mark.integration,
    # Ray (started by Flower's run_simulation) leaves a /dev/null handle and a helper process
    # to the garbage collector; test_simulation.py fails the same way without this filter.
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

TARGET = 4.0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = parse_experiment(
        {
            "name": "it-dp",
            "dataset": "synthetic:mlc",
            "rows": 450,
            "partition": {"kind": "iid", "num-branches": 3},
            "federation": {"num-rounds": 2, "lr": 0.05, "local-epochs": 1, "batch-size": 16},
            "baselines": {"torch-epochs": 2},
            "dp": {"target-epsilon": TARGET, "max-grad-norm": 1.0},
        }
    )
    return run_experiment(cfg, runs_root=tmp_path_factory.mktemp("runs"))


def test_ledger_is_filled_for_every_branch_and_round(run_dir: Path) -> None:
    ledger = PrivacyLedger(open_store(sqlite_url(run_dir / "ledger.db"), migrate=False))
    entries = ledger.entries(run_id=run_dir.name)
    assert len(entries) == 6
    assert all(e.decision == Decision.ADMITTED for e in entries)
    assert {e.privacy_unit for e in entries} == {PrivacyUnit.CUSTOMER}
    assert sorted({e.round for e in entries}) == [1, 2]
    for branch in {e.branch for e in entries}:
        mine = [e for e in entries if e.branch == branch]
        assert 0 < mine[0].cumulative_epsilon < mine[1].cumulative_epsilon <= TARGET
    # Each branch's accountant persists beside its export.
    assert len(list(run_dir.glob("branches/*/privacy/*.accountant.json"))) == 3


def test_replies_carry_epsilon_and_the_report_states_it(run_dir: Path) -> None:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    assert all(r["privacy"]["admitted"] == 3 and not r["refused"] for r in lines)
    assert 0 < lines[0]["train"]["dp-epsilon"] < lines[1]["train"]["dp-epsilon"] <= TARGET
    assert "train-loss" not in lines[0]["train"]  # the loss of private rows is never released
    privacy = json.loads((run_dir / "summary.json").read_text())["privacy"]
    assert privacy["privacy_unit"] == "customer" and privacy["accountant"] == "rdp"
    assert 0 < privacy["epsilon_max"] <= TARGET
    report = (run_dir / "report.md").read_text()
    assert "## Privacy" in report and "customer-level" in report and "δ = 1/n" in report


def test_ledger_show_prints_both_tables(run_dir: Path) -> None:
    result = CliRunner().invoke(app, ["ledger", "show", "--db", str(run_dir / "ledger.db")])
    assert result.exit_code == 0, result.output
    assert "Cumulative ε per branch" in result.output
    assert "round by round" in result.output
