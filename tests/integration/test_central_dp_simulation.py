"""Branch-level central DP on Flower's simulation engine (Ray): one server-side, one client-side.

The client-side run also trains with record-level DP-SGD, so its ledger holds both units.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedcrm.compliance import (
    Decision,
    LedgerEntry,
    PrivacyLedger,
    PrivacyUnit,
    open_store,
    sqlite_url,
)
from fedcrm.models.churn import model_from_state
from fedcrm.simulation.config import parse_experiment
from fedcrm.simulation.runner import run_experiment

pytestmark = [
    pytest.mark.integration,
    # Ray leaves a /dev/null handle and a helper process to the garbage collector (as in
    # test_dp_simulation.py).
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

TARGET = 20.0
ROUNDS = 2


def _run(tmp: Path, central: dict[str, object], **extra: object) -> Path:
    cfg = parse_experiment(
        {
            "name": "it-central-dp",
            "dataset": "synthetic:mlc",
            "rows": 450,
            "partition": {"kind": "iid", "num-branches": 3},
            "federation": {"num-rounds": ROUNDS, "lr": 0.05, "batch-size": 16},
            "baselines": {"enabled": False},
            "central-dp": central,
            **extra,
        }
    )
    return run_experiment(cfg, runs_root=tmp)


def _branch_rows(run_dir: Path) -> list[LedgerEntry]:
    ledger = PrivacyLedger(open_store(sqlite_url(run_dir / "ledger.db"), migrate=False))
    return ledger.entries(run_id=run_dir.name)


@pytest.mark.parametrize(
    ("central", "extra"),
    [
        ({"mode": "server-fixed", "target-epsilon": TARGET, "clipping-norm": 0.5}, {}),
        (
            {"mode": "client-adaptive", "target-epsilon": TARGET, "clipping-norm": 0.1},
            {"dp": {"target-epsilon": 8.0}},
        ),
    ],
    ids=["server-fixed", "client-adaptive+record-level"],
)
def test_central_dp_run_fills_ledger_and_releases_a_model(
    tmp_path: Path, central: dict[str, object], extra: dict[str, object]
) -> None:
    run_dir = _run(tmp_path, central, **extra)
    entries = _branch_rows(run_dir)
    branch_level = [e for e in entries if e.privacy_unit is PrivacyUnit.BRANCH]
    assert [e.round for e in branch_level] == list(range(1, ROUNDS + 1))
    assert all(e.decision is Decision.ADMITTED and e.branch == "federation" for e in branch_level)
    cumulative = [e.cumulative_epsilon for e in branch_level]
    assert 0 < cumulative[0] < cumulative[1] <= TARGET
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["central_dp"]["epsilon"] == pytest.approx(cumulative[-1])
    assert summary["central_dp"]["privacy_unit"] == "branch"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train"]["central-dp-branches"] == 3 for r in lines)
    assert "norm_bit" not in lines[0]["train"]  # the exact clipped share is never released
    model = model_from_state(load_file(str(run_dir / "model.safetensors")))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "Branch-level privacy" in (run_dir / "report.md").read_text()
    if "dp" in extra:  # both units, reported separately
        record_level = [e for e in entries if e.privacy_unit is PrivacyUnit.CUSTOMER]
        assert len(record_level) == 3 * ROUNDS
        assert summary["privacy"]["privacy_unit"] == "customer"
        clipping = [e.clipping_norm for e in branch_level]
        assert clipping[0] == pytest.approx(0.1) and clipping[1] != clipping[0]
