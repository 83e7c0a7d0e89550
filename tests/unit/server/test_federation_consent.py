"""The consent gate in the federated loop: manifests, purpose refusals, withdrawal, audit trail.

An in-process federation (no Ray) over three synthetic MLC branches whose consent registry is
one compliance store, as in a simulation. Branch 002's data is collected for recommendations
only, so it refuses a churn-training run.
"""

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fedcrm import constants as k
from fedcrm.client.app import branch_dir, make_client_app
from fedcrm.client.branch import write_export
from fedcrm.compliance import (
    ConsentRegistry,
    EventType,
    Notice,
    PrivacyLedger,
    Purpose,
    open_store,
    sqlite_url,
)
from fedcrm.compliance.audit import AuditLog
from fedcrm.compliance.consent import CSV_REQUIRED_COLUMNS
from fedcrm.compliance.lineage import LineageStore, customer_lineage
from fedcrm.compliance.manifest import ManifestArchive, RefusalCode
from fedcrm.data.check import coerce_frame
from fedcrm.data.schema import MLC
from fedcrm.data.synthetic import synthetic_export
from fedcrm.privacy.dp_sgd import InsecureRNGWarning
from fedcrm.privacy.federated import FederatedDPConfig
from fedcrm.server.config import FederationConfig
from fedcrm.server.federation import FederationStopped, RoundRecord, run_federation
from fedcrm.server.run_audit import RunAudit

CFG = FederationConfig(
    schema="mlc", num_rounds=3, lr=0.1, batch_size=32, hidden_layers="8", round_timeout=5
)
PURPOSE = Purpose.CHURN_MODEL_TRAINING
NOTICE = Notice.from_text("crm-notice", "2026-01", "notice text")
GIVEN_AT = datetime.now(UTC) - timedelta(days=10)


SIZES = (90, 80, 70)


def _ids(pid: int) -> list[str]:
    return [f"p_{pid}_{i}" for i in range(SIZES[pid])]


@pytest.fixture(scope="module")
def consent_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compliance store with every branch's consent, imported once (copied per test).

    000: all but 10 consented (5 refused, 5 never asked); 001: all; 002: recommendations.
    """
    path = tmp_path_factory.mktemp("consent") / "compliance.db"
    registry = ConsentRegistry(open_store(sqlite_url(path)))
    for pid, purpose in ((0, PURPOSE), (1, PURPOSE), (2, Purpose.RECOMMENDATION_TRAINING)):
        lines = [",".join(CSV_REQUIRED_COLUMNS)]
        for i, customer in enumerate(_ids(pid)):
            status = "refused" if pid == 0 and i < 5 else "given"
            if not (pid == 0 and 5 <= i < 10):
                lines.append(
                    f"{customer},{purpose.value},{status},consent,{GIVEN_AT.isoformat()},"
                    f"{NOTICE.notice_id},{NOTICE.version},{NOTICE.sha256},in-branch"
                )
        registry.import_csv(branch=f"{pid:03d}", source="\n".join(lines) + "\n", actor="t")
    return path


@pytest.fixture
def gated(federation: Any, tmp_path: Path, consent_template: Path) -> dict[str, Any]:
    """Three small branches gated on the copied consent store; 002 collects for recommendations.

    (The conftest's ``federation`` provides the in-process grid class.)
    """
    branches = tmp_path / "gated"
    for pid in range(3):
        frame = coerce_frame(synthetic_export(MLC, SIZES[pid], seed=pid), MLC)
        frame[MLC.id_column] = _ids(pid)
        write_export(frame, MLC, branch_dir(branches, pid) / "export.parquet")
    shutil.copyfile(consent_template, tmp_path / "compliance.db")
    url = sqlite_url(tmp_path / "compliance.db")
    app = make_client_app(branches, consent_db=url)
    nodes: dict[int, dict[str, int | str]] = {
        101 + pid: {k.NODE_PARTITION_ID: pid} for pid in range(3)
    }
    nodes[103][k.NODE_PURPOSES] = "recommendation-training"
    registry = ConsentRegistry(open_store(url, migrate=False))
    grid = type(federation.grid)(app, nodes)
    return {"url": url, "registry": registry, "grid": grid, "branches": branches}


def test_withdrawal_between_rounds_and_purpose_refusal(gated: dict[str, Any]) -> None:
    registry, branches = gated["registry"], gated["branches"]
    leaver = _ids(0)[20]
    audit = RunAudit(gated["url"], "run-1")

    def withdraw_after_first(record: RoundRecord) -> None:
        if record.round == 1:
            registry.withdraw(branch="000", subject=leaver, channel="web", actor="customer")

    result = run_federation(
        gated["grid"],
        CFG,
        min_nodes=3,
        run_id="run-1",
        purpose=PURPOSE,
        audit=audit,
        on_round=withdraw_after_first,
    )
    assert len(result.rounds) == 3
    # Branch 002 refused the statistics query (round 0) and every round with the structured
    # reason, and the run went on.
    assert [(e.round, e.refusal.branch, e.refusal.code) for e in result.consent_refusals] == [
        (r, "002", RefusalCode.PURPOSE_NOT_COLLECTED) for r in (0, 1, 2, 3)
    ]
    assert all(
        r.refused == [r.refused[0]] and "002: consent" in r.refused[0] for r in result.rounds
    )
    assert [r.consent["admitted"] for r in result.rounds] == [2.0, 2.0, 2.0]

    ours = {(e.round, e.manifest.branch): e.manifest for e in result.manifests}
    assert set(ours) == {(r, b) for r in (1, 2, 3) for b in ("000", "001")}
    first, second = ours[(1, "000")], ours[(2, "000")]
    assert first.rows_before - first.rows_after == sum(first.excluded.values()) > 0
    assert set(first.excluded) <= {"refused", "no-consent"}
    assert second.rows_after == first.rows_after - 1 and first.root != second.root
    assert second.excluded.get("withdrawn") == 1
    assert second.snapshot_version > first.snapshot_version
    assert ours[(1, "001")].root == ours[(3, "001")].root  # same customers, same root

    # The branch proves the leaver was in round 1 and not in rounds 2 and 3.
    store = LineageStore(open_store(gated["url"], migrate=False))
    archive = ManifestArchive(branch_dir(branches, 0) / "consent")
    lineage = customer_lineage(leaver, archive, branch="000", store=store, run_id="run-1")
    assert [(c.membership.round, c.membership.included) for c in lineage] == [
        (1, True),
        (2, False),
        (3, False),
    ]
    assert all(c.root_matches for c in lineage)
    assert lineage[0].membership.proof and lineage[0].membership.tree_size == first.leaves

    # Audit trail: configuration, 6 manifests, 4 refusals; it verifies; history kept.
    log = AuditLog(open_store(gated["url"], migrate=False))
    run_events = [e for e in log.entries() if e.subject is None]
    types = [e.event_type for e in run_events]
    assert types.count(EventType.CONFIGURATION_CHANGE) == 1
    assert types.count(EventType.ROUND_MANIFEST) == 6
    assert types.count(EventType.REFUSAL) == 4
    refusal = next(e for e in run_events if e.event_type == EventType.REFUSAL)
    body = log.read_body(refusal.index)
    assert (body["round"], body["code"]) == (0, "purpose-not-collected")
    folder = branches.parent
    report = audit.seal(folder / "audit-key.pem", folder / "audit-log.jsonl")
    assert report.ok and report.keys_trusted, report.issues
    events = [h.event.value for h in registry.record(branch="000", subject=leaver).history]
    assert events == ["given", "withdrawn"]
    # Salts stay on the branch, readable by its owner only.
    assert (archive.folder / "salts.json").stat().st_mode & 0o777 == 0o600


def test_refusals_below_min_train_nodes_stop_the_run(gated: dict[str, Any]) -> None:
    cfg = FederationConfig(**{**CFG.__dict__, "min_train_nodes": 3, "num_rounds": 1})
    with pytest.raises(FederationStopped, match="refused the run's purpose") as stopped:
        run_federation(gated["grid"], cfg, min_nodes=3, run_id="run-2", purpose=PURPOSE)
    assert stopped.value.result.consent_refusals[0].refusal.branch == "002"


def test_every_branch_refusing_the_statistics_query_stops_the_run(
    gated: dict[str, Any],
) -> None:
    """Marketing profiling: nobody consented, so every branch refuses with no-valid-consent.

    The refusals come at the statistics query, before round 1: recorded and audit-logged like
    a round's, and the run stops naming every branch's reason.
    """
    cfg = FederationConfig(**{**CFG.__dict__, "num_rounds": 1, "min_train_nodes": 1})
    grid = gated["grid"]
    for context in grid.contexts.values():
        context.node_config.pop(k.NODE_PURPOSES, None)
    audit = RunAudit(gated["url"], "run-3")
    with pytest.raises(FederationStopped, match="no branch returned statistics") as stopped:
        run_federation(
            grid,
            cfg,
            min_nodes=3,
            run_id="run-3",
            purpose=Purpose.MARKETING_PROFILING,
            audit=audit,
        )
    message = str(stopped.value)
    assert "3 of 3 refused the run's purpose" in message
    for branch in ("000", "001", "002"):
        assert f"{branch}: consent: no training row of this branch has valid consent" in message
    refusals = stopped.value.result.consent_refusals
    assert [(e.round, e.refusal.code) for e in refusals] == [(0, RefusalCode.NO_VALID_CONSENT)] * 3
    assert stopped.value.result.rounds == []
    log = AuditLog(open_store(gated["url"], migrate=False))
    logged = [e for e in log.entries() if e.event_type == EventType.REFUSAL]
    assert sorted(log.read_body(e.index)["branch"] for e in logged) == ["000", "001", "002"]
    assert {log.read_body(e.index)["round"] for e in logged} == {0}


def test_dp_run_with_gate_logs_ledger_entries(gated: dict[str, Any], tmp_path: Path) -> None:
    """Consent first, then the privacy budget: both decisions end up in the audit log."""
    cfg = FederationConfig(**{**CFG.__dict__, "num_rounds": 1})
    ledger = PrivacyLedger(open_store(sqlite_url(tmp_path / "ledger.db")))
    audit = RunAudit(gated["url"], "run-dp")
    with pytest.warns(InsecureRNGWarning):
        result = run_federation(
            gated["grid"],
            cfg,
            min_nodes=3,
            run_id="run-dp",
            purpose=PURPOSE,
            audit=audit,
            dp=FederatedDPConfig(target_epsilon=3.0, noise_multiplier=2.0),
            ledger=ledger,
        )
    assert sorted(e.report.branch for e in result.privacy) == ["000", "001"]
    assert [e.round for e in result.consent_refusals] == [0, 1]
    log = AuditLog(open_store(gated["url"], migrate=False))
    mine = [e for e in log.entries() if e.subject is None]
    ledger_events = [e for e in mine if e.event_type == EventType.LEDGER_ENTRY]
    assert {log.read_body(e.index)["branch"] for e in ledger_events} == {"000", "001"}
    # The DP plan used the gated row count: the ledger's delta is 1/n of consented rows.
    manifests = {e.manifest.branch: e.manifest for e in result.manifests}
    entries = {e.branch: e for e in ledger.entries(run_id="run-dp")}
    assert entries["000"].delta == pytest.approx(1 / manifests["000"].rows_after)
