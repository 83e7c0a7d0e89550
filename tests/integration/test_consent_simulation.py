"""The consent gate end to end on Flower's simulation engine (Ray), for every task.

Three synthetic branches, three rounds, ``[compliance]`` declaring the task's purpose: branch
002's data is collected for the other task's purpose only, so it refuses the run; a customer of
branch 000 withdraws between round 1 and round 2. One simulation per task serves every
assertion (a Ray start costs ~20 s on 2 cores).
"""

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from conftest import TASK_IDS, small_experiment
from fedcrm.cli import app
from fedcrm.compliance import ConsentRegistry, EventType, open_store, sqlite_url
from fedcrm.compliance.audit import AuditLog
from fedcrm.compliance.lineage import LineageStore, customer_lineage
from fedcrm.compliance.manifest import ManifestArchive
from fedcrm.data.pseudonymise import load_or_create_key
from fedcrm.data.schema import MLC
from fedcrm.server import RoundRecord
from fedcrm.simulation import parse_experiment, run_experiment
from fedcrm.tasks import get_task
from fedcrm.tasks.churn.branch import BranchData
from fedcrm.tasks.recommendation.data import RecSimulation, simulated_branch

pytestmark = [
    pytest.mark.integration,
    # Ray leaves a /dev/null handle and a helper process to the garbage collector (as in
    # test_dp_simulation.py).
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def _trained(run_dir: Path, cfg: Any) -> list[str]:
    """Branch 000's training customers (pseudonyms), as its ClientApp sees them."""
    folder = run_dir / "branches" / "000"
    if cfg.task == "churn":
        split = BranchData(folder / "export.parquet").load(MLC, seed=cfg.federation.seed)
        return [str(c) for c in split.train[MLC.id_column]]
    key = load_or_create_key(folder / "hmac.key")
    return simulated_branch(RecSimulation(cfg.spec, cfg.seed), 0, key).subjects()["train"]


def _given(run_dir: Path, cfg: Any) -> str:
    """A customer branch 000 trains on whose consent CSV says given (and nothing else)."""
    rows = list(csv.DictReader((run_dir / "branches" / "000" / "consent.csv").open()))
    statuses: dict[str, list[str]] = {}
    for row in rows:
        statuses.setdefault(row["customer_id"], []).append(row["status"])
    return next(c for c in _trained(run_dir, cfg) if statuses.get(c) == ["given"])


@pytest.fixture(scope="module", params=TASK_IDS)
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    task_name = request.param
    runs_root = tmp_path_factory.mktemp("runs")
    raw = small_experiment(
        task_name,
        federation={"num-rounds": 3},
        baselines={"enabled": False},
        compliance={
            "purpose": get_task(task_name).purpose,
            "withdrawn-share": 0.05,
            "refused-share": 0.05,
            "no-consent-share": 0.05,
            "uncovered-branches": [2],
        },
    )
    if task_name == "churn":
        raw["rows"] = 300
    cfg = parse_experiment(raw)
    leaver: dict[str, str] = {}
    names: list[str] = []

    def withdraw_after_first_round(record: RoundRecord) -> None:
        if record.round != 1:
            return
        (run_dir,) = runs_root.iterdir()
        customer = _given(run_dir, cfg)
        for info in sorted((run_dir / "branches").glob("*/branch.json")):
            names.append(json.loads(info.read_text())["name"])
        registry = ConsentRegistry(open_store(sqlite_url(run_dir / "compliance.db")))
        registry.withdraw(branch=names[0], subject=customer, channel="web", actor="customer")
        leaver["customer"] = customer

    run_dir = run_experiment(cfg, runs_root=runs_root, on_round=withdraw_after_first_round)
    return {"dir": run_dir, "customer": leaver["customer"], "names": names, "task": task_name}


def test_withdrawn_customer_is_in_round_1_only(run: dict[str, Any]) -> None:
    run_dir, customer, names = run["dir"], run["customer"], run["names"]
    store = LineageStore(open_store(sqlite_url(run_dir / "compliance.db"), migrate=False))
    manifests = {(m.round, m.manifest.branch): m.manifest for m in store.manifests()}
    assert set(manifests) == {(r, b) for r in (1, 2, 3) for b in names[:2]}
    first, second = manifests[(1, names[0])], manifests[(2, names[0])]
    assert second.rows_after == first.rows_after - 1
    assert second.excluded["withdrawn"] == first.excluded["withdrawn"] + 1
    archive = ManifestArchive(run_dir / "branches" / "000" / "consent")
    lineage = customer_lineage(customer, archive, branch=names[0], store=store)
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
    uncovered = f"{run['names'][2]}: consent"
    assert all(len(r["refused"]) == 1 and uncovered in r["refused"][0] for r in rounds)
    assert all(r["consent"]["admitted"] == 2 for r in rounds)
    log = AuditLog(open_store(sqlite_url(run_dir / "compliance.db"), migrate=False))
    refusals = [e for e in log.entries() if e.event_type == EventType.REFUSAL]
    assert len(refusals) == 4  # the statistics query (round 0) and rounds 1-3
    bodies = [log.read_body(e.index) for e in refusals]
    assert [b["round"] for b in bodies] == [0, 1, 2, 3]
    assert all(b["branch"] == run["names"][2] for b in bodies)
    assert bodies[0]["code"] == "purpose-not-collected"
    types = {e.event_type for e in log.entries()}
    assert {EventType.CONFIGURATION_CHANGE, EventType.MODEL_RELEASE} <= types


def test_history_kept_and_audit_log_verifies_offline(run: dict[str, Any]) -> None:
    run_dir, customer = run["dir"], run["customer"]
    registry = ConsentRegistry(open_store(sqlite_url(run_dir / "compliance.db"), migrate=False))
    history = registry.record(branch=run["names"][0], subject=customer).history
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
    assert gate["refused_branches"] == {run["names"][2]: "purpose-not-collected"}
    kept = {
        part: gate["rows_before"][part] - gate["rows_excluded"][part]
        for part in gate["rows_before"]
    }
    if run["task"] == "churn":  # the pooled rows the model is scored on and baselines train on
        assert summary["rows"] == kept
    else:  # the baselines' customers
        assert summary["split"]["evaluated_users"] == kept["test"]
    assert gate["excluded_by_reason"]["test"]["purpose-not-collected"] > 0
    assert "withdrawn" in gate["excluded_by_reason"]["train"]
    assert "Consent gate on evaluation" in (run_dir / "report.md").read_text()
