"""The write path of the consent registry: load the store's state, plan changes, write them.

One transaction per request or file: :func:`load` reads every subject's record, erasure and
latest event per purpose in a few chunked queries, :func:`plan` checks each change against
the rules and moves the latest state on, and :func:`write` writes the whole plan in bulk with
one audit event per change.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from fedcrm.compliance._types import utcnow
from fedcrm.compliance.audit._events import AuditEvent
from fedcrm.compliance.audit._log import INSERT_CHUNK, QUERY_CHUNK, AuditLog
from fedcrm.compliance.consent._checks import format_time
from fedcrm.compliance.consent._queries import latest_rank
from fedcrm.compliance.consent._records import Notice
from fedcrm.compliance.consent._rules import ERASED, Change, Latest, transition_problem
from fedcrm.compliance.enums import (
    CollectionMethod,
    ConsentStatus,
    EventType,
    LegalBasis,
    Purpose,
)
from fedcrm.compliance.models import AuditBodyKey, ConsentEvent, ConsentRecord


@dataclass(frozen=True, slots=True)
class Planned:
    """A change that passed the status rules, with what it inherits from the latest event."""

    subject: str
    record_id: str
    change: Change
    legal_basis: LegalBasis
    notice: Notice
    collection_method: CollectionMethod
    expires_at: datetime | None

    def body(self, branch: str) -> dict[str, Any]:
        """The body of its ``consent-change`` audit event (stored encrypted)."""
        return {
            "record_id": self.record_id,
            "branch": branch,
            "purpose": self.change.purpose.value,
            "event": self.change.event.value,
            "legal_basis": self.legal_basis.value,
            "occurred_at": format_time(self.change.occurred_at),
            "expires_at": format_time(self.expires_at),
            "actor": self.change.actor,
            "channel": self.change.channel.value,
            "collection_method": self.collection_method.value,
            "notice": self.notice.to_json(),
        }


@dataclass(slots=True)
class Batch:
    """Per-transaction state of a change: what the store holds and what is planned so far.

    :func:`load` fills ``records``, ``erased`` and ``latest`` for every subject of the batch at
    once; :func:`plan` checks each change against ``latest`` (then moves it on), and
    :func:`write` writes the plan in bulk.
    """

    branch: str
    records: dict[str, ConsentRecord] = field(default_factory=dict)
    erased: set[str] = field(default_factory=set)
    latest: dict[tuple[str, Purpose], Latest] = field(default_factory=dict)
    new_records: list[ConsentRecord] = field(default_factory=list)
    planned: list[Planned] = field(default_factory=list)


def _chunks(values: Sequence[Any], size: int | None = None) -> Iterable[Sequence[Any]]:
    step = QUERY_CHUNK if size is None else size
    for start in range(0, len(values), step):
        yield values[start : start + step]


def load(session: Session, branch: str, subjects: Iterable[str]) -> Batch:
    """Read the store's state of ``subjects`` at ``branch`` in a few chunked queries.

    Their records (locked, so a concurrent change of the same customer waits), whether
    they were erased, and each record's latest event per purpose: one query of each per
    :data:`~fedcrm.compliance.audit._log.QUERY_CHUNK` subjects, however long the file.
    """
    batch = Batch(branch)
    wanted = sorted(set(subjects))
    for chunk in _chunks(wanted):
        records = session.execute(
            select(ConsentRecord)
            .where(ConsentRecord.branch == branch, ConsentRecord.subject_ref.in_(chunk))
            .with_for_update()
        ).scalars()
        batch.records.update((record.subject_ref, record) for record in records)
        erased = session.execute(
            select(AuditBodyKey.subject_ref).where(
                AuditBodyKey.subject_ref.in_(chunk), AuditBodyKey.shredded_at.is_not(None)
            )
        ).scalars()
        batch.erased.update(subject for subject in erased if subject is not None)
    owners = {record.record_id: subject for subject, record in batch.records.items()}
    for chunk in _chunks(sorted(owners)):
        ranked = (
            select(
                ConsentEvent.record_id,
                ConsentEvent.purpose,
                ConsentEvent.event,
                ConsentEvent.legal_basis,
                ConsentEvent.occurred_at,
                ConsentEvent.expires_at,
                ConsentEvent.collection_method,
                ConsentEvent.notice_id,
                ConsentEvent.notice_version,
                ConsentEvent.notice_hash,
                latest_rank(),
            )
            .where(ConsentEvent.record_id.in_(chunk))
            .subquery()
        )
        for row in session.execute(select(ranked).where(ranked.c.rank == 1)):
            batch.latest[(owners[row.record_id], Purpose(row.purpose))] = Latest(
                ConsentStatus(row.event),
                LegalBasis(row.legal_basis),
                row.occurred_at,
                row.expires_at,
                CollectionMethod(row.collection_method),
                Notice(row.notice_id, row.notice_version, row.notice_hash),
            )
    return batch


def plan(batch: Batch, subject: str, change: Change) -> str | None:
    """Check one change against the subject's latest events and plan it.

    Returns the problem instead when the change breaks the status rules (nothing is
    planned then). The subject must have been loaded by :func:`load`.
    """
    if subject in batch.erased:
        return ERASED
    latest = batch.latest.get((subject, change.purpose))
    problem = transition_problem(latest, change)
    if problem is not None:
        return problem
    notice = change.notice or (latest.notice if latest else None)
    if notice is None:  # pragma: no cover - transition_problem refuses it
        return f"{change.purpose.value}: a notice is required"
    record = batch.records.get(subject)
    if record is None:
        record = ConsentRecord(
            record_id=secrets.token_hex(16),
            branch=batch.branch,
            subject_ref=subject,
            created_at=utcnow(),
        )
        batch.records[subject] = record
        batch.new_records.append(record)
    planned = Planned(
        subject=subject,
        record_id=record.record_id,
        change=change,
        legal_basis=change.legal_basis or (latest.legal_basis if latest else LegalBasis.CONSENT),
        notice=notice,
        collection_method=change.collection_method
        or (latest.collection_method if latest else CollectionMethod.ONLINE_FORM),
        expires_at=change.expires_at if change.event.is_valid else None,
    )
    batch.planned.append(planned)
    batch.latest[(subject, change.purpose)] = Latest(
        change.event,
        planned.legal_basis,
        change.occurred_at,
        planned.expires_at,
        planned.collection_method,
        notice,
    )
    return None


def plan_all(batch: Batch, changes: Mapping[str, Sequence[Change]]) -> list[tuple[Change, str]]:
    """Plan every subject's changes in order; return each refused change with its problem."""
    return [
        (change, problem)
        for subject, items in changes.items()
        for change in items
        if (problem := plan(batch, subject, change)) is not None
    ]


def write(session: Session, batch: Batch, audit: AuditLog) -> None:
    """Write a checked plan: new records, one audit event per change, the history rows.

    Bulk statements throughout; the audit events go through :meth:`AuditLog.append_many`
    (one lock of the log head, the subjects' keys read or created together), and each history
    row carries its event's leaf index.
    """
    records = [
        {
            "record_id": record.record_id,
            "branch": record.branch,
            "subject_ref": record.subject_ref,
            "created_at": record.created_at,
        }
        for record in batch.new_records
    ]
    for chunk in _chunks(records, INSERT_CHUNK):
        session.execute(insert(ConsentRecord), chunk)
    recorded = utcnow()
    entries = audit.append_many(
        [
            AuditEvent(
                EventType.CONSENT_CHANGE,
                planned.body(batch.branch),
                subject=planned.subject,
                time=recorded,
            )
            for planned in batch.planned
        ],
        session=session,
    )
    events = [
        {
            "record_id": planned.record_id,
            "purpose": planned.change.purpose,
            "event": planned.change.event,
            "legal_basis": planned.legal_basis,
            "occurred_at": planned.change.occurred_at,
            "expires_at": planned.expires_at,
            "actor": planned.change.actor,
            "channel": planned.change.channel,
            "collection_method": planned.collection_method,
            "notice_id": planned.notice.notice_id,
            "notice_version": planned.notice.version,
            "notice_hash": planned.notice.sha256,
            "audit_index": entry.index,
            "recorded_at": recorded,
        }
        for planned, entry in zip(batch.planned, entries, strict=True)
    ]
    for chunk in _chunks(events, INSERT_CHUNK):
        session.execute(insert(ConsentEvent), chunk)
