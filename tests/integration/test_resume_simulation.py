"""`fedcrm resume`: a DP simulation stopped after round 2 goes on in its own run directory.

Flower's simulation engine (Ray) runs both halves; the ledger, the accountants and the
metrics file end as if the run had not stopped, with every spend recorded once.
"""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.compliance import Decision, PrivacyLedger, open_store, sqlite_url
from fedcrm.server.result import RoundRecord
from fedcrm.simulation.config import parse_experiment
from fedcrm.simulation.runner import run_experiment

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def test_a_stopped_dp_run_resumes_after_its_last_completed_round(tmp_path: Path) -> None:
    cfg = parse_experiment(
        {
            "name": "it-resume",
            "dataset": "synthetic:mlc",
            "rows": 450,
            "partition": {"kind": "iid", "num-branches": 3},
            "federation": {"num-rounds": 3, "lr": 0.05, "batch-size": 16},
            "baselines": {"torch-epochs": 2},
            "dp": {"target-epsilon": 4.0},
        }
    )

    def stop_after_two(record: RoundRecord) -> None:
        if record.round == 2:
            raise RuntimeError("the coordinator dies after round 2")

    with pytest.raises(RuntimeError, match="dies after round 2"):
        run_experiment(cfg, runs_root=tmp_path, on_round=stop_after_two)
    (run_dir,) = tmp_path.iterdir()
    assert not (run_dir / "summary.json").exists()
    result = CliRunner().invoke(app, ["resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["federated"]["rounds"] == 3
    ledger = PrivacyLedger(open_store(sqlite_url(run_dir / "ledger.db"), migrate=False))
    for branch in {e.branch for e in ledger.entries()}:
        mine = ledger.entries(branch=branch, decision=Decision.ADMITTED)
        assert [e.round for e in mine] == [1, 2, 3]  # round 3 once: nothing counted twice
        assert mine[0].cumulative_epsilon < mine[1].cumulative_epsilon < mine[2].cumulative_epsilon
        assert len({e.spend_id for e in mine}) == 3
