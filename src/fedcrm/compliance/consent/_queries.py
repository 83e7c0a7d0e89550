"""The read side of the consent registry: records with their history, and per-purpose states.

Every question about many customers (the consent gate's valid ids, a snapshot, coverage counts)
is one query over each record's latest event per purpose at a time, classified by
:func:`_state` in SQL.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Label, String, and_, case, cast, func, literal, or_, select
from sqlalchemy.orm import Session

from fedcrm.compliance.consent._records import (
    ConsentRecordView,
    ConsentSnapshot,
    CoverageCount,
    HistoryEntry,
    Notice,
)
from fedcrm.compliance.db import equalities
from fedcrm.compliance.enums import (
    VALID_STATUSES,
    Channel,
    CollectionMethod,
    ConsentStatus,
    LegalBasis,
    Purpose,
)
from fedcrm.compliance.errors import ConsentNotFound
from fedcrm.compliance.models import AuditBodyKey, ConsentEvent, ConsentRecord


def latest_rank() -> Label[int]:
    """Rank of an event within its record and purpose, latest first (1: the current one)."""
    return (
        func.row_number()
        .over(
            partition_by=(ConsentEvent.record_id, ConsentEvent.purpose),
            order_by=(ConsentEvent.occurred_at.desc(), ConsentEvent.id.desc()),
        )
        .label("rank")
    )


def _history_entry(row: ConsentEvent) -> HistoryEntry:
    return HistoryEntry(
        purpose=Purpose(row.purpose),
        event=ConsentStatus(row.event),
        legal_basis=LegalBasis(row.legal_basis),
        occurred_at=row.occurred_at,
        expires_at=row.expires_at,
        actor=row.actor,
        channel=Channel(row.channel),
        collection_method=CollectionMethod(row.collection_method),
        notice=Notice(row.notice_id, row.notice_version, row.notice_hash),
        audit_index=row.audit_index,
        recorded_at=row.recorded_at,
    )


def record_view(session: Session, record: ConsentRecord) -> ConsentRecordView:
    """Return a stored record with its whole history, oldest event first."""
    rows = session.execute(
        select(ConsentEvent)
        .where(ConsentEvent.record_id == record.record_id)
        .order_by(ConsentEvent.occurred_at, ConsentEvent.id)
    ).scalars()
    shredded = session.execute(
        select(AuditBodyKey.shredded_at).where(AuditBodyKey.subject_ref == record.subject_ref)
    ).scalar_one_or_none()
    return ConsentRecordView(
        record_id=record.record_id,
        branch=record.branch,
        subject=record.subject_ref,
        created_at=record.created_at,
        erased=shredded is not None,
        history=tuple(_history_entry(row) for row in rows),
    )


def find_record(session: Session, branch: str, subject: str) -> ConsentRecordView:
    """Return a customer's record with its whole history.

    Raises:
        ConsentNotFound: The customer has no record at this branch.
    """
    record = session.execute(
        select(ConsentRecord).where(
            ConsentRecord.branch == branch, ConsentRecord.subject_ref == subject
        )
    ).scalar_one_or_none()
    if record is None:
        raise ConsentNotFound(f"no consent record for this customer at branch {branch!r}")
    return record_view(session, record)


def _latest_events(at: datetime, purpose: Purpose | None, branch: str | None) -> Any:
    """Subquery: each record's latest event per purpose at ``at`` (rank 1)."""
    return (
        select(
            ConsentRecord.branch,
            ConsentRecord.subject_ref,
            ConsentEvent.purpose,
            ConsentEvent.event,
            ConsentEvent.occurred_at,
            ConsentEvent.expires_at,
            AuditBodyKey.shredded_at,
            latest_rank(),
        )
        .join(ConsentRecord, ConsentRecord.record_id == ConsentEvent.record_id)
        .outerjoin(AuditBodyKey, AuditBodyKey.subject_ref == ConsentRecord.subject_ref)
        .where(
            ConsentEvent.occurred_at <= at,
            *equalities((ConsentEvent.purpose, purpose), (ConsentRecord.branch, branch)),
        )
        .subquery()
    )


def _state(latest: Any, at: datetime) -> ColumnElement[str]:
    """A latest event's state at ``at``: erased, valid, expired, refused or withdrawn."""
    given = latest.c.event.in_(VALID_STATUSES)
    return case(
        (latest.c.shredded_at.is_not(None), literal("erased", String)),
        (
            and_(given, or_(latest.c.expires_at.is_(None), latest.c.expires_at > at)),
            literal("valid", String),
        ),
        (given, literal("expired", String)),
        else_=cast(latest.c.event, String),
    )


def valid_ids(session: Session, branch: str, purpose: Purpose, at: datetime) -> frozenset[str]:
    """Return the pseudonymous ids whose consent for ``purpose`` is valid at ``at``."""
    latest = _latest_events(at, purpose, branch)
    query = select(latest.c.subject_ref).where(
        latest.c.rank == 1, _state(latest, at) == literal("valid", String)
    )
    return frozenset(session.execute(query).scalars())


def snapshot(session: Session, branch: str, purpose: Purpose, at: datetime) -> ConsentSnapshot:
    """Return every known customer's consent state for ``purpose`` at ``at``, and its version."""
    latest = _latest_events(at, purpose, branch)
    query = select(latest.c.subject_ref, _state(latest, at), latest.c.occurred_at).where(
        latest.c.rank == 1
    )
    version_query = (
        select(func.max(ConsentEvent.audit_index))
        .join(ConsentRecord, ConsentRecord.record_id == ConsentEvent.record_id)
        .where(ConsentRecord.branch == branch)
    )
    states: dict[str, str] = {}
    since: dict[str, datetime] = {}
    for subject, state, occurred in session.execute(query):
        states[subject] = state
        since[subject] = occurred
    version = session.execute(version_query).scalar_one_or_none()
    return ConsentSnapshot(
        branch=branch,
        purpose=purpose,
        at=at,
        version=-1 if version is None else int(version),
        states=states,
        since=since,
    )


def coverage(session: Session, at: datetime, branch: str | None) -> list[CoverageCount]:
    """Return consent counts per branch and purpose at ``at`` (aggregates only, no ids)."""
    latest = _latest_events(at, None, branch)
    classified = (
        select(latest.c.branch, latest.c.purpose, _state(latest, at).label("state"))
        .where(latest.c.rank == 1)
        .subquery()
    )
    query = select(
        classified.c.branch, classified.c.purpose, classified.c.state, func.count()
    ).group_by(classified.c.branch, classified.c.purpose, classified.c.state)
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for row_branch, row_purpose, row_state, number in session.execute(query):
        counts.setdefault((row_branch, str(row_purpose)), {})[row_state] = number
    return [
        CoverageCount(
            branch=row_branch,
            purpose=Purpose(row_purpose),
            customers=sum(by_state.values()),
            valid=by_state.get("valid", 0),
            expired=by_state.get("expired", 0),
            refused=by_state.get("refused", 0),
            withdrawn=by_state.get("withdrawn", 0),
            erased=by_state.get("erased", 0),
        )
        for (row_branch, row_purpose), by_state in sorted(counts.items())
    ]


def branches(session: Session) -> list[str]:
    """Return every branch with at least one consent record."""
    query = select(ConsentRecord.branch).distinct().order_by(ConsentRecord.branch)
    return list(session.execute(query).scalars())
