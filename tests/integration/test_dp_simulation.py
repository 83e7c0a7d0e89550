"""Record-level DP on Flower's simulation engine (Ray): ledger, replies, report, CLI.

One simulation serves most assertions (a Ray start costs ~20 s on 2 cores); a second run of
the same experiment, with its shared privacy store and ledger, shows the budget holding across
`fedcrm simulate` runs.
"""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.compliance import Decision, PrivacyLedger, PrivacyUnit, open_store, sqlite_url
from fedcrm.server import FederationStopped
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
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the experiment's privacy store and ledger, shared by its runs."""
    return tmp_path_factory.mktemp("shared")


def _experiment(shared: Path) -> dict[str, object]:
    return {
        "name": "it-dp",
        "dataset": "synthetic:mlc",
        "rows": 450,
        "partition": {"kind": "iid", "num-branches": 3},
        "federation": {"num-rounds": 2, "lr": 0.05, "local-epochs": 1, "batch-size": 16},
        "baselines": {"torch-epochs": 2},
        "dp": {
            "target-epsilon": TARGET,
            "max-grad-norm": 1.0,
            "privacy-store": str(shared / "privacy"),
            "ledger-url": sqlite_url(shared / "ledger.db"),
        },
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, shared: Path) -> Path:
    return run_experiment(parse_experiment(_experiment(shared)), runs_root=shared / "runs")


def _ledger(shared: Path) -> PrivacyLedger:
    return PrivacyLedger(open_store(sqlite_url(shared / "ledger.db"), migrate=False))


def test_ledger_is_filled_for_every_branch_and_round(run_dir: Path, shared: Path) -> None:
    ledger = _ledger(shared)
    entries = ledger.entries(run_id=run_dir.name)
    assert len(entries) == 6
    assert all(e.decision == Decision.ADMITTED for e in entries)
    assert {e.privacy_unit for e in entries} == {PrivacyUnit.CUSTOMER}
    assert sorted({e.round for e in entries}) == [1, 2]
    for branch in {e.branch for e in entries}:
        mine = [e for e in entries if e.branch == branch]
        assert 0 < mine[0].cumulative_epsilon < mine[1].cumulative_epsilon <= TARGET
    # Each branch's accountant lives in the shared store, not in the run.
    assert len(list(shared.glob("privacy/*/*.accountant.json"))) == 3
    assert not list(run_dir.glob("branches/*/privacy"))


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
    assert "## Privacy" in report and "customer-level" in report and "δ = 1/(10n)" in report


def test_ledger_show_prints_both_tables(run_dir: Path, shared: Path) -> None:
    result = CliRunner().invoke(app, ["ledger", "show", "--db", str(shared / "ledger.db")])
    assert result.exit_code == 0, result.output
    assert "Cumulative ε per branch" in result.output
    assert "round by round" in result.output


def test_a_second_run_of_the_experiment_finds_the_budget_spent(run_dir: Path, shared: Path) -> None:
    """The same experiment again: every branch refuses round 1 before it trains."""
    ledger = _ledger(shared)
    totals = {t.branch: t.cumulative_epsilon for t in ledger.totals()}
    with pytest.raises(FederationStopped, match=r"only 0 of 3 branches were admitted \(3 refused"):
        run_experiment(parse_experiment(_experiment(shared)), runs_root=shared / "runs")
    second = sorted((shared / "runs").iterdir())[-1].name
    refused = ledger.entries(run_id=second)
    assert len(refused) == 3 and all(e.decision == Decision.REFUSED for e in refused)
    assert all(e.cumulative_epsilon == totals[e.branch] for e in refused)
    assert {t.branch: t.cumulative_epsilon for t in ledger.totals()} == totals
