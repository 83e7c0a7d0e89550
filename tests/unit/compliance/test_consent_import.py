"""Bulk consent import: validated, every bad row named, all or nothing (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from fedcrm.compliance import (
    ConsentImportError,
    ConsentRegistry,
    ConsentValidationError,
    Notice,
    Purpose,
)
from fedcrm.compliance.audit import AuditLog, EventType
from fedcrm.compliance.audit import _log as log_module
from fedcrm.compliance.consent import _changes as consent_changes
from fedcrm.compliance.enums import KeyScope
from fedcrm.compliance.models import AuditBodyKey, ConsentEvent, ConsentRecord

NOTICE = Notice.from_text("crm-privacy-notice", "2026-01", "notice text")
HEADER = (
    "customer_id,purpose,status,legal_basis,occurred_at,expires_at,notice_id,notice_version,"
    "notice_hash,channel"
)
AFTER = datetime(2026, 6, 1, tzinfo=UTC)


def row(
    customer: str,
    status: str = "given",
    *,
    purpose: str = "churn-model-training",
    at: str = "2026-01-01T09:00:00Z",
    expires: str = "",
    basis: str = "consent",
    notice_hash: str = NOTICE.sha256,
    channel: str = "in-branch",
) -> str:
    return (
        f"{customer},{purpose},{status},{basis},{at},{expires},{NOTICE.notice_id},"
        f"{NOTICE.version},{notice_hash},{channel}"
    )


def csv_of(*rows: str, header: str = HEADER) -> str:
    return "\n".join((header, *rows)) + "\n"


def count(
    store: sessionmaker[Session],
    model: type[ConsentEvent] | type[ConsentRecord] | type[AuditBodyKey],
) -> int:
    with store() as session:
        return int(session.execute(select(func.count()).select_from(model)).scalar_one())


def test_a_good_file_imports_every_row(any_store: sessionmaker[Session]) -> None:
    registry = ConsentRegistry(any_store)
    summary = registry.import_csv(
        branch="b1",
        source=csv_of(
            row("p_1"),
            row("p_1", purpose="recommendation-training", basis="explicit-consent"),
            row("p_2", expires="2027-01-01T00:00:00+00:00"),
            row("p_3", "refused"),
            row("p_4"),
            row("p_4", "withdrawn", at="2026-02-01T00:00:00Z"),
            "",  # blank lines are skipped
        ),
        actor="b1/import-job",
    )
    assert (summary.rows, summary.events, summary.customers, summary.records_created) == (
        6,
        6,
        4,
        4,
    )
    assert registry.valid_for("b1", Purpose.CHURN_MODEL_TRAINING, AFTER) == {"p_1", "p_2"}
    assert registry.valid_for("b1", Purpose.RECOMMENDATION_TRAINING, AFTER) == {"p_1"}
    history = registry.record(branch="b1", subject="p_4").history
    assert [h.event.value for h in history] == ["given", "withdrawn"]
    assert {h.actor for h in history} == {"b1/import-job"}
    assert {h.collection_method.value for h in history} == {"branch-import"}
    # Every imported event is in the audit log.
    assert AuditLog(any_store).size() == 6


def test_a_bad_file_names_every_bad_row_and_imports_nothing(
    any_store: sessionmaker[Session],
) -> None:
    registry = ConsentRegistry(any_store)
    registry.give(
        branch="b1",
        subject="p_existing",
        purposes=[Purpose.CHURN_MODEL_TRAINING],
        notice=NOTICE,
        channel="web",
        actor="customer",
        at=datetime(2025, 1, 1, tzinfo=UTC),
    )
    audit_size = AuditLog(any_store).size()
    events = count(any_store, ConsentEvent)
    text = csv_of(
        row("p_ok_1"),  # line 2: fine
        row("jane.doe@example.com"),  # line 3: not a pseudonym
        row("p_5", purpose="ad-targeting"),  # line 4
        row("p_6", at="2026-01-01 09:00"),  # line 5: no time zone
        row("p_7", notice_hash="abc"),  # line 6
        row("p_8", "withdrawn"),  # line 7: nothing to withdraw
        row("p_existing"),  # line 8: already given in the store
        row("p_9", expires="2025-01-01T00:00:00Z"),  # line 9: expires before it was given
        row("p_ok_2"),  # line 10: fine
        "p_10,churn-model-training,given",  # line 11: too few fields
        row("p_11", "expired"),  # line 12: not importable
        row("p_ok_2", at="2025-12-01T00:00:00Z"),  # line 13: given again (and backdated)
    )
    with pytest.raises(ConsentImportError) as caught:
        registry.import_csv(branch="b1", source=text, actor="importer")
    lines = [error.line for error in caught.value.errors]
    assert lines == [3, 4, 5, 6, 7, 8, 9, 11, 12, 13]
    reasons = {error.line: error.reason for error in caught.value.errors}
    assert "pseudonym" in reasons[3]
    assert "purpose must be one of" in reasons[4]
    assert "timezone-aware" in reasons[5]
    assert "notice_hash" in reasons[6]
    assert "nothing to withdraw" in reasons[7]
    assert "already given" in reasons[8]
    assert "expires_at must be after" in reasons[9]
    assert "expected 10 fields" in reasons[11]
    assert "status must be one of" in reasons[12]
    assert "line 13" in str(caught.value)
    # Nothing half-imported: not the good rows, not their audit events.
    assert count(any_store, ConsentEvent) == events
    assert AuditLog(any_store).size() == audit_size
    with pytest.raises(Exception, match="no consent record"):
        registry.record(branch="b1", subject="p_ok_1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        (HEADER + "\n", "no rows"),
        (HEADER.replace(",channel", "") + "\n", "missing column(s): channel"),
        (HEADER + ",email\n", "unexpected column(s): email"),
        (HEADER + ",channel\n", "duplicated column(s): channel"),
    ],
    ids=["empty", "header-only", "missing-column", "pii-column", "duplicate-column"],
)
def test_header_problems_are_line_one(
    store: sessionmaker[Session], text: str, message: str
) -> None:
    with pytest.raises(ConsentImportError) as caught:
        ConsentRegistry(store).import_csv(branch="b1", source=text, actor="importer")
    assert caught.value.errors[0].line == 1
    assert message in caught.value.errors[0].reason


def test_branch_and_actor_are_validated(store: sessionmaker[Session]) -> None:
    with pytest.raises(ConsentValidationError) as caught:
        ConsentRegistry(store).import_csv(branch="b 1", source=csv_of(row("p_1")), actor="")
    assert len(caught.value.problems) == 2


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny query and insert chunks, so that a small file crosses every chunk boundary."""
    monkeypatch.setattr(consent_changes, "QUERY_CHUNK", 7)
    monkeypatch.setattr(consent_changes, "INSERT_CHUNK", 5)
    monkeypatch.setattr(log_module, "QUERY_CHUNK", 7)
    monkeypatch.setattr(log_module, "INSERT_CHUNK", 5)


@pytest.mark.usefixtures("small_chunks")
def test_a_bulk_import_writes_one_event_and_one_provable_leaf_per_row(
    any_store: sessionmaker[Session], signing_key: Ed25519PrivateKey
) -> None:
    registry = ConsentRegistry(any_store)
    log = AuditLog(any_store)
    first = [row(f"p_{i:03d}") for i in range(40)]
    first += [row(f"p_{i:03d}", purpose="recommendation-training") for i in range(10)]
    registry.import_csv(branch="b1", source=csv_of(*first), actor="importer")
    # A second file: customers already in the store (their latest events are read back in
    # chunks) withdraw or renew, and new customers arrive.
    second = [row(f"p_{i:03d}", "withdrawn", at="2026-02-01T00:00:00Z") for i in range(0, 40, 3)]
    second += [row(f"p_{i:03d}", "renewed", at="2026-02-01T00:00:00Z") for i in range(1, 40, 3)]
    second += [row(f"p_new_{i}") for i in range(6)]
    summary = registry.import_csv(branch="b1", source=csv_of(*second), actor="importer")
    assert (summary.rows, summary.events, summary.records_created) == (len(second), 33, 6)

    rows = len(first) + len(second)
    with any_store() as session:
        events = session.execute(select(ConsentEvent).order_by(ConsentEvent.audit_index)).scalars()
        indices = [event.audit_index for event in events]
        key_rows = session.execute(
            select(AuditBodyKey.subject_ref, AuditBodyKey.key_id).where(
                AuditBodyKey.scope == KeyScope.SUBJECT
            )
        )
        subject_keys = {row.subject_ref: row.key_id for row in key_rows}
    assert indices == list(range(rows))
    assert log.size() == rows
    assert len(subject_keys) == 46  # one body key per customer (crypto-shredding)
    checkpoint = log.checkpoint(signing_key)
    for index in indices:
        log.inclusion_proof(index, checkpoint.tree_size).verify(checkpoint.root_hash)
        entry = log.entry(index)
        assert entry.event_type is EventType.CONSENT_CHANGE
        assert entry.subject is not None
        assert entry.key_id == subject_keys[entry.subject]
    body = log.read_body(len(first))
    assert (body["event"], body["branch"]) == ("withdrawn", "b1")
    assert log.verify().ok
    valid = registry.valid_for("b1", Purpose.CHURN_MODEL_TRAINING, AFTER)
    assert len(valid) == 40 - 14 + 6
    assert "p_000" not in valid
    assert "p_001" in valid


@pytest.mark.usefixtures("small_chunks")
def test_one_bad_row_in_a_large_file_imports_nothing(any_store: sessionmaker[Session]) -> None:
    registry = ConsentRegistry(any_store)
    rows = [row(f"p_{i:03d}") for i in range(60)]
    rows[41] = row("p_041", "withdrawn")  # line 43: nothing to withdraw
    with pytest.raises(ConsentImportError) as caught:
        registry.import_csv(branch="b1", source=csv_of(*rows), actor="importer")
    assert [
        (error.line, "nothing to withdraw" in error.reason) for error in caught.value.errors
    ] == [(43, True)]
    assert count(any_store, ConsentEvent) == 0
    assert count(any_store, ConsentRecord) == 0
    assert count(any_store, AuditBodyKey) == 0
    assert AuditLog(any_store).size() == 0
