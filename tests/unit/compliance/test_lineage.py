"""Consent snapshots for the gate, and lineage records, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from fedcrm.compliance import ConsentRegistry, EventType, ManifestError, Notice, Purpose
from fedcrm.compliance.audit import AuditLog
from fedcrm.compliance.lineage import LineageStore, customer_lineage
from fedcrm.compliance.manifest import ManifestArchive, RoundManifest

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOTICE = Notice.from_text("n", "v1", "text")
CHURN = Purpose.CHURN_MODEL_TRAINING


def _manifest(branch: str, root: str, rows: int, before: int) -> RoundManifest:
    return RoundManifest(
        branch=branch,
        purpose=CHURN,
        root=root,
        leaves=rows,
        snapshot_version=3,
        rows_before=before,
        rows_after=rows,
        excluded={"withdrawn": before - rows} if before > rows else {},
    )


def test_snapshot_states_and_version(any_store: sessionmaker[Session]) -> None:
    registry = ConsentRegistry(any_store)
    give = {"purposes": [CHURN], "notice": NOTICE, "channel": "web", "actor": "customer"}
    registry.give(branch="b1", subject="p_valid", at=T0, **give)  # type: ignore[arg-type]
    registry.give(branch="b1", subject="p_gone", at=T0, **give)  # type: ignore[arg-type]
    registry.withdraw(
        branch="b1", subject="p_gone", channel="web", actor="customer", at=T0 + timedelta(days=2)
    )
    registry.give(  # type: ignore[arg-type]
        branch="b1", subject="p_old", at=T0, expires_at=T0 + timedelta(days=1), **give
    )
    registry.refuse(branch="b1", subject="p_no", at=T0, **give)  # type: ignore[arg-type]
    registry.give(branch="b1", subject="p_erased", at=T0, **give)  # type: ignore[arg-type]
    registry.erase(branch="b1", subject="p_erased", reason="dsar")
    registry.give(branch="b2", subject="p_other", at=T0, **give)  # type: ignore[arg-type]

    before = registry.snapshot("b1", CHURN, T0 + timedelta(hours=1))
    assert before.valid() == {"p_valid", "p_gone", "p_old"}
    after = registry.snapshot("b1", "churn-model-training", T0 + timedelta(days=3))
    assert dict(after.states) == {
        "p_valid": "valid",
        "p_gone": "withdrawn",
        "p_old": "expired",
        "p_no": "refused",
        "p_erased": "erased",
    }
    assert after.valid() == registry.valid_for("b1", CHURN, T0 + timedelta(days=3))
    assert after.version == before.version >= 0  # the latest consent change of b1
    assert after.since["p_gone"] == T0 + timedelta(days=2)
    assert registry.snapshot("b1", Purpose.MARKETING_PROFILING, T0).states == {}
    assert registry.snapshot("nobody", CHURN, T0).version == -1


def test_lineage_records_with_audit_events(
    any_store: sessionmaker[Session], tmp_path: Path
) -> None:
    archive = ManifestArchive(tmp_path / "consent")
    fields = {
        "branch": "b1",
        "purpose": CHURN,
        "snapshot_version": 3,
        "rows_before": 3,
        "excluded": {},
    }
    r1 = archive.commit(
        run_id="run-1",
        server_round=1,
        customers=["p_a", "p_b", "p_c"],
        manifest_fields={**fields, "rows_after": 3},
        created_at=T0,
    )
    r2 = archive.commit(
        run_id="run-1",
        server_round=2,
        customers=["p_a", "p_c"],
        manifest_fields={**fields, "rows_after": 2, "excluded": {"withdrawn": 1}},
        created_at=T0,
    )
    log = AuditLog(any_store)
    store = LineageStore(any_store, audit=log)
    store.record_manifest(run_id="run-1", server_round=1, manifest=r1)
    store.record_manifest(run_id="run-1", server_round=2, manifest=r2)
    store.record_manifest(run_id="run-1", server_round=1, manifest=_manifest("b2", "a" * 64, 5, 5))
    with pytest.raises(ManifestError, match="already has a manifest"):
        store.record_manifest(run_id="run-1", server_round=1, manifest=r1)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    release = store.record_release(run_id="run-1", model="churn", path=model, last_round=1)
    assert len(release.sha256) == 64

    uses = store.uses(branch="b1")
    assert [(u.record.round, [m.sha256 for m in u.models]) for u in uses] == [
        (1, [release.sha256]),
        (2, []),
    ]
    (summary,) = store.runs()
    assert (summary.rounds, summary.branches, summary.manifests) == (2, 2, 3)
    assert (summary.rows_used, summary.rows_excluded, summary.models) == (10, 1, 1)
    types = [e.event_type for e in log.entries()]
    assert types == [EventType.ROUND_MANIFEST] * 3 + [EventType.MODEL_RELEASE]
    assert log.read_body(uses[1].record.audit_index)["root"] == r2.root

    lineage = customer_lineage("p_b", archive, branch="b1", store=store)
    assert [(c.membership.round, c.membership.included, c.root_matches) for c in lineage] == [
        (1, True, True),
        (2, False, True),
    ]
    assert [len(c.models) for c in lineage] == [1, 0]


def test_lineage_tables_are_append_only(any_store: sessionmaker[Session]) -> None:
    store = LineageStore(any_store)
    store.record_manifest(run_id="r", server_round=1, manifest=_manifest("b1", "b" * 64, 2, 2))
    with pytest.raises(DBAPIError), any_store() as session, session.begin():
        session.execute(text("UPDATE round_manifests SET rows_after = 1"))
    with pytest.raises(DBAPIError), any_store() as session, session.begin():
        session.execute(text("DELETE FROM round_manifests"))
    assert store.manifests()[0].manifest.rows_after == 2
