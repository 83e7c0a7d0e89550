"""The consent gate end to end on Flower's simulation engine (Ray).

Three synthetic branches, three rounds, ``[compliance]`` declaring churn-model training:
branch 002's data is collected for recommendations only, so it refuses the run; a customer of
branch 000 withdraws between round 1 and round 2. One simulation serves every assertion (a Ray
start costs ~20 s on 2 cores).
"""

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.client.branch import BranchData
from fedcrm.compliance import ConsentRegistry, EventType, open_store, sqlite_url
from fedcrm.compliance.audit import AuditLog
from fedcrm.compliance.lineage import LineageStore, customer_lineage
from fedcrm.compliance.manifest import ManifestArchive
from fedcrm.data.schema import MLC
from fedcrm.server.federation import RoundRecord
from fedcrm.simulation.config import parse_experiment
from fedcrm.simulation.runner import run_experiment

pytestmark = [
    pytest.mark.integration,
    # Ray leaves a /dev/null handle and a helper process to the garbage collector (as in
    # test_dp_simulation.py).
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def _given(run_dir: Path, folder: str) -> str:
    """A customer the branch trains on whose consent CSV says given (and nothing else)."""
    rows = list(csv.DictReader((run_dir / "branches" / folder / "consent.csv").open()))
    statuses: dict[str, list[str]] = {}
    for row in rows:
        statuses.setdefault(row["customer_id"], []).append(row["status"])
    split = BranchData(run_dir / "branches" / folder / "export.parquet").load(MLC, seed=42)
    return str(next(c for c in split.train[MLC.id_column] if statuses.get(c) == ["given"]))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    runs_root = tmp_path_factory.mktemp("runs")
    cfg = parse_experiment(
        {
            "name": "it-consent",
            "dataset": "synthetic:mlc",
            "rows": 300,
            "partition": {"kind": "iid", "num-branches": 3},
            "federation": {"num-rounds": 3, "lr": 0.05, "batch-size": 32, "hidden-layers": "8"},
            "baselines": {"enabled": False},
            "compliance": {
                "purpose": "churn-model-training",
                "withdrawn-share": 0.05,
                "refused-share": 0.05,
                "no-consent-share": 0.05,
                "uncovered-branches": [2],
            },
        }
    )
    leaver: dict[str, str] = {}

    def withdraw_after_first_round(record: RoundRecord) -> None:
        if record.round != 1:
            return
        (run_dir,) = runs_root.iterdir()
        customer = _given(run_dir, "000")
        registry = ConsentRegistry(open_store(sqlite_url(run_dir / "compliance.db")))
        registry.withdraw(branch="branch-00", subject=customer, channel="web", actor="customer")
        leaver["customer"] = customer

    run_dir = run_experiment(cfg, runs_root=runs_root, on_round=withdraw_after_first_round)
    return {"dir": run_dir, "customer": leaver["customer"]}


def test_withdrawn_customer_is_in_round_1_only(run: dict[str, Any]) -> None:
    run_dir, customer = run["dir"], run["customer"]
    store = LineageStore(open_store(sqlite_url(run_dir / "compliance.db"), migrate=False))
    manifests = {(m.round, m.manifest.branch): m.manifest for m in store.manifests()}
    assert set(manifests) == {(r, b) for r in (1, 2, 3) for b in ("branch-00", "branch-01")}
    first, second = manifests[(1, "branch-00")], manifests[(2, "branch-00")]
    assert second.rows_after == first.rows_after - 1
    assert second.excluded["withdrawn"] == first.excluded["withdrawn"] + 1
    archive = ManifestArchive(run_dir / "branches" / "000" / "consent")
    lineage = customer_lineage(customer, archive, branch="branch-00", store=store)
    assert [(c.membership.round, c.membership.included) for c in lineage] == [
        (1, True),
        (2, False),
        (3, False),
    ]
    assert all(c.root_matches for c in lineage)
    # The release includes round 1 only if it was the best round: models listed accordingly.
    best = json.loads((run_dir / "summary.json").read_text())["federated"]["best_round"]
    assert [len(c.models) for c in lineage] == [1 if best >= 1 else 0, 0, 0]


def test_uncovered_branch_is_refused_and_logged(run: dict[str, Any]) -> None:
    run_dir = run["dir"]
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(len(r["refused"]) == 1 and "branch-02: consent" in r["refused"][0] for r in rounds)
    assert all(r["consent"]["admitted"] == 2 for r in rounds)
    log = AuditLog(open_store(sqlite_url(run_dir / "compliance.db"), migrate=False))
    refusals = [e for e in log.entries() if e.event_type == EventType.REFUSAL]
    assert len(refusals) == 4  # the statistics query (round 0) and rounds 1-3
    bodies = [log.read_body(e.index) for e in refusals]
    assert [b["round"] for b in bodies] == [0, 1, 2, 3]
    assert all(b["branch"] == "branch-02" for b in bodies)
    assert bodies[0]["code"] == "purpose-not-collected"
    types = {e.event_type for e in log.entries()}
    assert {EventType.CONFIGURATION_CHANGE, EventType.MODEL_RELEASE} <= types


def test_history_kept_and_audit_log_verifies_offline(run: dict[str, Any]) -> None:
    run_dir, customer = run["dir"], run["customer"]
    registry = ConsentRegistry(open_store(sqlite_url(run_dir / "compliance.db"), migrate=False))
    history = registry.record(branch="branch-00", subject=customer).history
    assert [h.event.value for h in history] == ["given", "withdrawn"]
    summary = json.loads((run_dir / "summary.json").read_text())["compliance"]
    assert summary["audit_verified"] and summary["manifests"] == 6
    result = CliRunner().invoke(
        app,
        [
            "audit",
            "verify",
            str(run_dir / "audit-log.jsonl"),
            "--public-key",
            str(run_dir / "audit-key.pem.pub"),
        ],
    )
    assert result.exit_code == 0, result.output


def test_final_evaluation_uses_only_gated_rows(run: dict[str, Any]) -> None:
    run_dir = run["dir"]
    summary = json.loads((run_dir / "summary.json").read_text())
    gate = summary["compliance"]["evaluation_gate"]
    assert gate["refused_branches"] == {"branch-02": "purpose-not-collected"}
    for split in ("train", "val", "test"):
        assert summary["rows"][split] == gate["rows_before"][split] - gate["rows_excluded"][split]
    assert gate["excluded_by_reason"]["test"]["purpose-not-collected"] > 0
    assert "withdrawn" in gate["excluded_by_reason"]["train"]
    assert "Consent gate on evaluation" in (run_dir / "report.md").read_text()
