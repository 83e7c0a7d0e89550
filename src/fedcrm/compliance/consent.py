"""The consent registry: per-customer, per-purpose consent with an append-only history.

Shaped after W3C DPV (``dpv:ConsentRecord``, ``dpv:ConsentStatus``, ``dpv:LegalBasis``) and
ISO/IEC TS 27560 (consent record information structure): a record per pseudonymous customer and
branch, and for each purpose its legal basis, status, notice (id, version, SHA-256), collection
method, channel, actor and expiry. Nothing is ever overwritten: every change appends a
``consent_events`` row (the database refuses UPDATE and DELETE on it) and a ``consent-change``
audit event whose subject is the customer's pseudonym, in the same transaction.

Status rules (the state machine enforced on every change, import included):
    * ``given``: not while the purpose is validly given (use ``renewed``);
    * ``refused``: not while the purpose is validly given (use ``withdrawn``);
    * ``withdrawn``: only while validly given (given or renewed, before expiry);
    * ``renewed``: only after ``given`` or ``renewed`` (expired included), never after a
      withdrawal or refusal (that needs a new ``given``);
    * no event may be dated before the purpose's latest recorded event;
    * an erased customer (audit key crypto-shredded) takes no further change.

A customer's consent for a purpose is *valid at t* when its latest event at ``t`` is ``given``
or ``renewed``, its expiry (if any) is after ``t``, and the customer was not erased.

Notes:
    The registry keeps pseudonymous history after an erasure (Art. 7(1) GDPR: the controller
    must be able to demonstrate consent); the audit bodies, which hold the details, become
    unreadable once the subject's key is destroyed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import String, and_, case, func, insert, literal, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from fedcrm.compliance._types import utcnow
from fedcrm.compliance.audit._events import AuditEvent, validate_subject_ref
from fedcrm.compliance.audit._log import INSERT_CHUNK, QUERY_CHUNK, AuditLog
from fedcrm.compliance.db import transaction
from fedcrm.compliance.enums import (
    Channel,
    CollectionMethod,
    ConsentStatus,
    EventType,
    LegalBasis,
    Purpose,
)
from fedcrm.compliance.errors import (
    ConsentError,
    ConsentImportError,
    ConsentNotFound,
    ConsentStateError,
    ConsentValidationError,
    ImportRowError,
)
from fedcrm.compliance.models import AuditBodyKey, ConsentEvent, ConsentRecord

logger = logging.getLogger(__name__)

RECEIPT_VERSION = 1
"""Version of the JSON consent receipt layout."""

CSV_REQUIRED_COLUMNS = (
    "customer_id",
    "purpose",
    "status",
    "legal_basis",
    "occurred_at",
    "notice_id",
    "notice_version",
    "notice_hash",
    "channel",
)
"""Columns every consent CSV must have (``customer_id`` is the pseudonymous id)."""

CSV_OPTIONAL_COLUMNS = ("expires_at", "collection_method")
"""Columns a consent CSV may have; ``collection_method`` defaults to ``branch-import``."""

CSV_IMPORTABLE_STATUSES = frozenset(
    {ConsentStatus.GIVEN, ConsentStatus.REFUSED, ConsentStatus.WITHDRAWN, ConsentStatus.RENEWED}
)
"""Statuses a CSV row may carry (``expired`` is derived from ``expires_at``)."""

MAX_IMPORT_ROWS = 200_000
"""Largest consent CSV accepted in one import (one transaction)."""

_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_ACTOR_PATTERN = re.compile(r"[A-Za-z0-9_.:/\-]{1,128}")
_HASH_PATTERN = re.compile(r"[0-9a-f]{64}")
_VALID = (ConsentStatus.GIVEN, ConsentStatus.RENEWED)

PurposeSelection = (
    Mapping[Purpose, LegalBasis | str] | Mapping[str, LegalBasis | str] | Iterable[Purpose | str]
)
"""Purposes with their legal basis, or purposes alone (legal basis ``consent``)."""
_ATTEMPTS = 3


def _enum(value: Any, enum_cls: type[Any], name: str, problems: list[str]) -> Any:
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum_cls)
        problems.append(f"{name} must be one of {allowed}; got {value!r}")
        return None


def _check_name(value: Any, name: str, problems: list[str], pattern: re.Pattern[str]) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        allowed = "letters, digits and _.:-" + ("/" if pattern is _ACTOR_PATTERN else "")
        problems.append(f"{name} must be 1-128 characters: {allowed}")


def _check_subject(subject: Any, problems: list[str]) -> None:
    try:
        if not isinstance(subject, str):
            raise ValueError("the customer id must be a string")
        validate_subject_ref(subject)
    except ValueError as exc:
        problems.append(f"customer id: {exc}")


def _aware(value: datetime | None, name: str, problems: list[str]) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        problems.append(f"{name} must be timezone-aware (e.g. 2026-01-31T12:00:00Z)")
        return None
    return value.astimezone(UTC)


def _fmt(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


@dataclass(frozen=True, slots=True)
class Notice:
    """The privacy notice the customer was shown: id, version and SHA-256 of its text.

    Args:
        notice_id: Stable identifier of the notice, e.g. ``privacy-notice-crm``.
        version: Its version, e.g. ``2026-03``.
        sha256: Lower-case hex SHA-256 of the exact text shown.

    Raises:
        ConsentValidationError: A field is malformed.
    """

    notice_id: str
    version: str
    sha256: str

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check_name(self.notice_id, "notice_id", problems, _NAME_PATTERN)
        if not isinstance(self.version, str) or not 0 < len(self.version.strip()) <= 64:
            problems.append("notice_version must be a non-empty string of at most 64 characters")
        if not isinstance(self.sha256, str) or not _HASH_PATTERN.fullmatch(self.sha256):
            problems.append("notice_hash must be a lower-case hex SHA-256 (64 characters)")
        if problems:
            raise ConsentValidationError(problems)

    @classmethod
    def from_text(cls, notice_id: str, version: str, text: str | bytes) -> Notice:
        """Build the notice reference of a text (hashed as UTF-8 if given as ``str``)."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        return cls(notice_id, version, hashlib.sha256(data).hexdigest())

    def to_json(self) -> dict[str, str]:
        """Return the notice as JSON data."""
        return {"notice_id": self.notice_id, "version": self.version, "sha256": self.sha256}


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One event of a consent record's append-only history, for one purpose."""

    purpose: Purpose
    event: ConsentStatus
    legal_basis: LegalBasis
    occurred_at: datetime
    expires_at: datetime | None
    actor: str
    channel: Channel
    collection_method: CollectionMethod
    notice: Notice
    audit_index: int
    recorded_at: datetime

    def to_json(self) -> dict[str, Any]:
        """Return the event as JSON data (ISO 8601 UTC times)."""
        return {
            "purpose": self.purpose.value,
            "event": self.event.value,
            "legal_basis": self.legal_basis.value,
            "occurred_at": _fmt(self.occurred_at),
            "expires_at": _fmt(self.expires_at),
            "actor": self.actor,
            "channel": self.channel.value,
            "collection_method": self.collection_method.value,
            "notice": self.notice.to_json(),
            "audit_index": self.audit_index,
            "recorded_at": _fmt(self.recorded_at),
        }


@dataclass(frozen=True, slots=True)
class PurposeStatus:
    """The status of one purpose at a given time, from the latest event at that time."""

    purpose: Purpose
    status: ConsentStatus
    legal_basis: LegalBasis
    since: datetime
    expires_at: datetime | None
    notice: Notice

    @property
    def valid(self) -> bool:
        """Whether processing for this purpose is allowed (given or renewed, not expired)."""
        return self.status.is_valid

    def to_json(self) -> dict[str, Any]:
        """Return the status as JSON data."""
        return {
            "purpose": self.purpose.value,
            "status": self.status.value,
            "valid": self.valid,
            "legal_basis": self.legal_basis.value,
            "since": _fmt(self.since),
            "expires_at": _fmt(self.expires_at),
            "notice": self.notice.to_json(),
        }


def _status_from(entry: HistoryEntry, at: datetime) -> PurposeStatus:
    status = entry.event
    if status.is_valid and entry.expires_at is not None and entry.expires_at <= at:
        status = ConsentStatus.EXPIRED
    return PurposeStatus(
        entry.purpose, status, entry.legal_basis, entry.occurred_at, entry.expires_at, entry.notice
    )


@dataclass(frozen=True, slots=True)
class ConsentRecordView:
    """A consent record with its whole history, oldest event first."""

    record_id: str
    branch: str
    subject: str
    created_at: datetime
    erased: bool
    history: tuple[HistoryEntry, ...]

    def status_at(self, at: datetime | None = None) -> dict[Purpose, PurposeStatus]:
        """Return the status of every purpose with an event at or before ``at`` (default now).

        An erased customer's consents are reported as they were recorded; use
        :attr:`erased` (or :meth:`ConsentRegistry.valid_for`) for the processing decision.
        """
        moment = utcnow() if at is None else at
        latest: dict[Purpose, HistoryEntry] = {}
        for entry in self.history:
            if entry.occurred_at <= moment:
                latest[entry.purpose] = entry
        return {purpose: _status_from(entry, moment) for purpose, entry in latest.items()}

    def valid_purposes(self, at: datetime | None = None) -> frozenset[Purpose]:
        """Return the purposes validly consented at ``at`` (none once erased)."""
        if self.erased:
            return frozenset()
        return frozenset(p for p, s in self.status_at(at).items() if s.valid)


@dataclass(frozen=True, slots=True)
class CoverageCount:
    """How many customers of a branch are in each consent state for one purpose.

    ``customers`` counts every record with at least one event for the purpose (at the time
    asked), so ``valid + expired + refused + withdrawn + erased == customers``.
    """

    branch: str
    purpose: Purpose
    customers: int
    valid: int
    expired: int
    refused: int
    withdrawn: int
    erased: int

    @property
    def coverage(self) -> float:
        """Share of known customers whose consent is valid (0.0 when none are known)."""
        return self.valid / self.customers if self.customers else 0.0


@dataclass(frozen=True, slots=True)
class ConsentSnapshot:
    """The consent state of every known customer of a branch for one purpose, at one time.

    ``states`` maps a pseudonymous id to ``valid``, ``expired``, ``refused``, ``withdrawn``
    or ``erased``; a customer with no event for the purpose is absent (no consent). ``since``
    is the time of that customer's latest event for the purpose. ``version`` is the audit-log
    index of the branch's latest consent change (-1: the branch has none).
    """

    branch: str
    purpose: Purpose
    at: datetime
    version: int
    states: Mapping[str, str]
    since: Mapping[str, datetime]

    def valid(self) -> frozenset[str]:
        """Return the customers whose consent is valid at :attr:`at`."""
        return frozenset(s for s, state in self.states.items() if state == "valid")


@dataclass(frozen=True, slots=True)
class ImportSummary:
    """What a successful bulk import wrote."""

    branch: str
    rows: int
    records_created: int
    events: int
    customers: int


@dataclass(frozen=True, slots=True)
class _Change:
    purpose: Purpose
    event: ConsentStatus
    legal_basis: LegalBasis | None
    occurred_at: datetime
    expires_at: datetime | None
    actor: str
    channel: Channel
    collection_method: CollectionMethod | None
    notice: Notice | None
    line: int = 0


@dataclass(slots=True)
class _Latest:
    event: ConsentStatus
    legal_basis: LegalBasis
    occurred_at: datetime
    expires_at: datetime | None
    collection_method: CollectionMethod
    notice: Notice

    def valid_at(self, at: datetime) -> bool:
        return self.event.is_valid and (self.expires_at is None or self.expires_at > at)


@dataclass(frozen=True, slots=True)
class _Planned:
    """A change that passed the status rules, with what it inherits from the latest event."""

    subject: str
    record_id: str
    change: _Change
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
            "occurred_at": _fmt(self.change.occurred_at),
            "expires_at": _fmt(self.expires_at),
            "actor": self.change.actor,
            "channel": self.change.channel.value,
            "collection_method": self.collection_method.value,
            "notice": self.notice.to_json(),
        }


@dataclass(slots=True)
class _Batch:
    """Per-transaction state of a change: what the store holds and what is planned so far.

    :meth:`ConsentRegistry._load` fills ``records``, ``erased`` and ``latest`` for every
    subject of the batch at once; :meth:`ConsentRegistry._plan` checks each change against
    ``latest`` (then moves it on), and :meth:`ConsentRegistry._write` writes the plan in bulk.
    """

    branch: str
    records: dict[str, ConsentRecord] = field(default_factory=dict)
    erased: set[str] = field(default_factory=set)
    latest: dict[tuple[str, Purpose], _Latest] = field(default_factory=dict)
    new_records: list[ConsentRecord] = field(default_factory=list)
    planned: list[_Planned] = field(default_factory=list)


def _chunks(values: Sequence[Any], size: int | None = None) -> Iterable[Sequence[Any]]:
    step = QUERY_CHUNK if size is None else size
    for start in range(0, len(values), step):
        yield values[start : start + step]


_ERASED = "the customer was erased (crypto-shredded); no further consent is recorded"


def _transition_problem(latest: _Latest | None, change: _Change) -> str | None:
    """Return why ``change`` cannot follow ``latest`` (module docstring rules), or None."""
    name = change.purpose.value
    if latest is not None and change.occurred_at < latest.occurred_at:
        return (
            f"{name}: the event is dated {_fmt(change.occurred_at)}, before the latest recorded "
            f"event ({latest.event.value} at {_fmt(latest.occurred_at)}); history is append-only"
        )
    valid = latest is not None and latest.valid_at(change.occurred_at)
    if change.event is ConsentStatus.GIVEN and valid:
        return f"{name}: consent is already given; renew it instead"
    if change.event is ConsentStatus.REFUSED and valid:
        return f"{name}: consent is currently given; withdraw it instead of refusing"
    if change.event is ConsentStatus.WITHDRAWN and not valid:
        current = "no consent" if latest is None else f"status {latest.event.value}"
        if latest is not None and latest.event.is_valid:
            current = "an expired consent"
        return f"{name}: nothing to withdraw ({current})"
    if change.event is ConsentStatus.RENEWED and (latest is None or not latest.event.is_valid):
        current = "no consent" if latest is None else f"status {latest.event.value}"
        return f"{name}: only a given or renewed consent can be renewed ({current}); give it anew"
    if change.event is ConsentStatus.EXPIRED and (latest is None or not latest.event.is_valid):
        return f"{name}: only a given or renewed consent can expire"
    if (
        change.event in (ConsentStatus.GIVEN, ConsentStatus.REFUSED)
        and change.notice is None
        and latest is None
    ):
        return f"{name}: a notice is required"
    return None


def _row_to_entry(row: ConsentEvent) -> HistoryEntry:
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


def _parse_time(text: str, name: str, problems: list[str]) -> datetime | None:
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        problems.append(f"{name} {text!r} is not an ISO 8601 time (e.g. 2026-01-31T12:00:00Z)")
        return None
    return _aware(value, name, problems)


class ConsentRegistry:
    """Repository and service of the consent registry.

    Args:
        session_factory: From :func:`fedcrm.compliance.db.open_store` (schema at head).
        audit: The audit log every change is written to (atomically, same transaction);
            defaults to the log in the same store.

    Example:
        >>> registry = ConsentRegistry(factory)  # doctest: +SKIP
        >>> registry.give(branch="b1", subject="p_0001",
        ...               purposes={Purpose.CHURN_MODEL_TRAINING: LegalBasis.CONSENT},
        ...               notice=notice, channel=Channel.WEB, actor="customer")  # doctest: +SKIP
        >>> registry.withdraw(branch="b1", subject="p_0001", channel=Channel.WEB,
        ...                   actor="customer")  # doctest: +SKIP
    """

    def __init__(
        self, session_factory: sessionmaker[Session], *, audit: AuditLog | None = None
    ) -> None:
        self._factory = session_factory
        self._audit = audit if audit is not None else AuditLog(session_factory)

    # -- changes ---------------------------------------------------------------------------

    def give(
        self,
        *,
        branch: str,
        subject: str,
        purposes: PurposeSelection,
        notice: Notice,
        channel: Channel | str,
        actor: str,
        collection_method: CollectionMethod | str = CollectionMethod.ONLINE_FORM,
        expires_at: datetime | None = None,
        at: datetime | None = None,
    ) -> ConsentRecordView:
        """Record that the customer gave consent for ``purposes``.

        Args:
            branch: The branch holding the customer's data.
            subject: The customer's pseudonymous id.
            purposes: Purposes with their legal basis, or purposes alone (basis ``consent``).
            notice: The notice shown.
            channel: Where the customer gave it.
            actor: Who recorded it (``customer`` for self-service, or a staff pseudonym).
            collection_method: How it was captured.
            expires_at: When it lapses unless renewed (None: no expiry).
            at: When it was given (default now).

        Returns:
            The record after the change.

        Raises:
            ConsentValidationError: An argument is malformed (every problem listed).
            ConsentStateError: A purpose is already given, or the customer was erased.
        """
        return self._apply_simple(
            ConsentStatus.GIVEN,
            branch=branch,
            subject=subject,
            purposes=purposes,
            notice=notice,
            channel=channel,
            actor=actor,
            collection_method=collection_method,
            expires_at=expires_at,
            at=at,
        )

    def refuse(
        self,
        *,
        branch: str,
        subject: str,
        purposes: PurposeSelection,
        notice: Notice,
        channel: Channel | str,
        actor: str,
        collection_method: CollectionMethod | str = CollectionMethod.ONLINE_FORM,
        at: datetime | None = None,
    ) -> ConsentRecordView:
        """Record that the customer was asked and refused (arguments as :meth:`give`).

        Raises:
            ConsentValidationError: An argument is malformed.
            ConsentStateError: A purpose is currently given (withdraw it instead).
        """
        return self._apply_simple(
            ConsentStatus.REFUSED,
            branch=branch,
            subject=subject,
            purposes=purposes,
            notice=notice,
            channel=channel,
            actor=actor,
            collection_method=collection_method,
            expires_at=None,
            at=at,
        )

    def withdraw(
        self,
        *,
        branch: str,
        subject: str,
        channel: Channel | str,
        actor: str,
        purposes: Iterable[Purpose | str] | None = None,
        at: datetime | None = None,
    ) -> ConsentRecordView:
        """Withdraw consent: as few arguments as giving, and every purpose by default.

        Takes effect at ``at`` (default now): :meth:`valid_for` excludes the customer for any
        later time. Legal basis, notice and collection method are carried over from the
        withdrawn consent.

        Args:
            branch: The customer's branch.
            subject: The customer's pseudonymous id.
            channel: Where the customer withdrew.
            actor: Who recorded it.
            purposes: The purposes to withdraw; None withdraws every validly given one.
            at: When (default now).

        Raises:
            ConsentNotFound: The customer has no record at this branch.
            ConsentStateError: A named purpose (or, with None, every purpose) is not given.
        """
        moment = self._moment(at)
        if purposes is None:
            view = self.record(branch=branch, subject=subject)
            chosen: list[Purpose | str] = sorted(view.valid_purposes(moment))
            if not chosen:
                raise ConsentStateError("nothing to withdraw: no purpose is validly given")
        else:
            chosen = list(purposes)
        return self._apply_simple(
            ConsentStatus.WITHDRAWN,
            branch=branch,
            subject=subject,
            purposes=chosen,
            notice=None,
            channel=channel,
            actor=actor,
            collection_method=None,
            expires_at=None,
            at=moment,
            must_exist=True,
        )

    def renew(
        self,
        *,
        branch: str,
        subject: str,
        channel: Channel | str,
        actor: str,
        expires_at: datetime | None,
        purposes: Iterable[Purpose | str] | None = None,
        notice: Notice | None = None,
        at: datetime | None = None,
    ) -> ConsentRecordView:
        """Renew given (possibly expired) consents, with a new expiry and optionally a new notice.

        Args:
            branch: The customer's branch.
            subject: The customer's pseudonymous id.
            channel: Where the customer renewed.
            actor: Who recorded it.
            expires_at: The new expiry (None: no expiry).
            purposes: The purposes to renew; None renews every given or renewed one.
            notice: The notice shown now; None keeps the previous one.
            at: When (default now).

        Raises:
            ConsentNotFound: The customer has no record at this branch.
            ConsentStateError: A purpose was never given, or was withdrawn or refused.
        """
        moment = self._moment(at)
        if purposes is None:
            view = self.record(branch=branch, subject=subject)
            chosen: list[Purpose | str] = sorted(
                p
                for p, s in view.status_at(moment).items()
                if s.status.is_valid or s.status is ConsentStatus.EXPIRED
            )
            if not chosen:
                raise ConsentStateError("nothing to renew: no purpose was given")
        else:
            chosen = list(purposes)
        return self._apply_simple(
            ConsentStatus.RENEWED,
            branch=branch,
            subject=subject,
            purposes=chosen,
            notice=notice,
            channel=channel,
            actor=actor,
            collection_method=None,
            expires_at=expires_at,
            at=moment,
            must_exist=True,
        )

    @staticmethod
    def _moment(at: datetime | None) -> datetime:
        if at is None:
            return utcnow()
        problems: list[str] = []
        moment = _aware(at, "at", problems)
        if moment is None:
            raise ConsentValidationError(problems)
        return moment

    def _apply_simple(
        self,
        event: ConsentStatus,
        *,
        branch: str,
        subject: str,
        purposes: PurposeSelection,
        notice: Notice | None,
        channel: Channel | str,
        actor: str,
        collection_method: CollectionMethod | str | None,
        expires_at: datetime | None,
        at: datetime | None,
        must_exist: bool = False,
    ) -> ConsentRecordView:
        problems: list[str] = []
        _check_name(branch, "branch", problems, _NAME_PATTERN)
        _check_subject(subject, problems)
        _check_name(actor, "actor", problems, _ACTOR_PATTERN)
        moment = utcnow() if at is None else _aware(at, "at", problems)
        expiry = _aware(expires_at, "expires_at", problems)
        chan = _enum(channel, Channel, "channel", problems)
        method = (
            None
            if collection_method is None
            else _enum(collection_method, CollectionMethod, "collection_method", problems)
        )
        pairs: list[tuple[Any, Any]]
        if isinstance(purposes, Mapping):
            pairs = list(purposes.items())
        elif isinstance(purposes, str):
            pairs = [(purposes, None)]
        else:
            pairs = [(p, None) for p in purposes]
        if not pairs:
            problems.append("at least one purpose is required")
        parsed: list[tuple[Purpose, LegalBasis | None]] = []
        for raw_purpose, raw_basis in pairs:
            purpose = _enum(raw_purpose, Purpose, "purpose", problems)
            basis = None if raw_basis is None else _enum(raw_basis, LegalBasis, "basis", problems)
            if purpose is not None:
                parsed.append((purpose, basis))
        if len({p for p, _ in parsed}) != len(parsed):
            problems.append("a purpose is listed twice")
        if moment is not None and expiry is not None and expiry <= moment:
            problems.append("expires_at must be after the time of the event")
        if problems or moment is None:
            raise ConsentValidationError(problems)
        if event in (ConsentStatus.GIVEN, ConsentStatus.REFUSED):
            parsed = [(p, b if b is not None else LegalBasis.CONSENT) for p, b in parsed]
        changes = [
            _Change(
                purpose=purpose,
                event=event,
                legal_basis=basis,
                occurred_at=moment,
                expires_at=expiry,
                actor=actor,
                channel=chan,
                collection_method=method,
                notice=notice,
            )
            for purpose, basis in parsed
        ]
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                with transaction(self._factory) as session:
                    batch = _Batch(branch)
                    self._load(session, batch, [subject])
                    if subject in batch.erased:
                        raise ConsentStateError(_ERASED)
                    if must_exist and subject not in batch.records:
                        raise ConsentNotFound(
                            f"no consent record for this customer at branch {branch!r}"
                        )
                    errors = [
                        problem
                        for change in changes
                        if (problem := self._plan(batch, subject, change)) is not None
                    ]
                    if errors:
                        raise ConsentStateError("; ".join(errors))
                    self._write(session, batch)
                    view = self._view(session, batch.records[subject])
            except IntegrityError:
                # Only a concurrent first change for the same customer can collide on the
                # (branch, subject) unique key; everything was rolled back: retry.
                if attempt == _ATTEMPTS:
                    raise
                continue
            logger.info("consent: %s for %d purpose(s) at branch %s", event, len(changes), branch)
            return view
        raise AssertionError("unreachable")  # pragma: no cover

    def _load(self, session: Session, batch: _Batch, subjects: Sequence[str]) -> None:
        """Read the store's state of ``subjects`` into ``batch`` in a few chunked queries.

        Their records (locked, so a concurrent change of the same customer waits), whether
        they were erased, and each record's latest event per purpose: one query of each per
        :data:`~fedcrm.compliance.audit._log.QUERY_CHUNK` subjects, however long the file.
        """
        wanted = sorted(set(subjects) - batch.records.keys())
        for chunk in _chunks(wanted):
            records = session.execute(
                select(ConsentRecord)
                .where(ConsentRecord.branch == batch.branch, ConsentRecord.subject_ref.in_(chunk))
                .with_for_update()
            ).scalars()
            batch.records.update((record.subject_ref, record) for record in records)
            erased = session.execute(
                select(AuditBodyKey.subject_ref).where(
                    AuditBodyKey.subject_ref.in_(chunk), AuditBodyKey.shredded_at.is_not(None)
                )
            ).scalars()
            batch.erased.update(subject for subject in erased if subject is not None)
        owners = {
            batch.records[subject].record_id: subject
            for subject in wanted
            if subject in batch.records
        }
        rank = (
            func.row_number()
            .over(
                partition_by=(ConsentEvent.record_id, ConsentEvent.purpose),
                order_by=(ConsentEvent.occurred_at.desc(), ConsentEvent.id.desc()),
            )
            .label("rank")
        )
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
                    rank,
                )
                .where(ConsentEvent.record_id.in_(chunk))
                .subquery()
            )
            for row in session.execute(select(ranked).where(ranked.c.rank == 1)):
                batch.latest[(owners[row.record_id], Purpose(row.purpose))] = _Latest(
                    ConsentStatus(row.event),
                    LegalBasis(row.legal_basis),
                    row.occurred_at,
                    row.expires_at,
                    CollectionMethod(row.collection_method),
                    Notice(row.notice_id, row.notice_version, row.notice_hash),
                )

    @staticmethod
    def _plan(batch: _Batch, subject: str, change: _Change) -> str | None:
        """Check one change against the subject's latest events and plan it.

        Returns the problem instead when the change breaks the status rules (nothing is
        planned then). The subject must have been loaded by :meth:`_load`.
        """
        if subject in batch.erased:
            return _ERASED
        latest = batch.latest.get((subject, change.purpose))
        problem = _transition_problem(latest, change)
        if problem is not None:
            return problem
        notice = change.notice or (latest.notice if latest else None)
        if notice is None:  # pragma: no cover - _transition_problem refuses it
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
        planned = _Planned(
            subject=subject,
            record_id=record.record_id,
            change=change,
            legal_basis=change.legal_basis
            or (latest.legal_basis if latest else LegalBasis.CONSENT),
            notice=notice,
            collection_method=change.collection_method
            or (latest.collection_method if latest else CollectionMethod.ONLINE_FORM),
            expires_at=change.expires_at if change.event.is_valid else None,
        )
        batch.planned.append(planned)
        batch.latest[(subject, change.purpose)] = _Latest(
            change.event,
            planned.legal_basis,
            change.occurred_at,
            planned.expires_at,
            planned.collection_method,
            notice,
        )
        return None

    def _write(self, session: Session, batch: _Batch) -> None:
        """Write a checked plan: new records, one audit event per change, the history rows.

        Bulk statements throughout; the audit events go through
        :meth:`AuditLog.append_many` (one lock of the log head, the subjects' keys read or
        created together), and each history row carries its event's leaf index.
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
        entries = self._audit.append_many(
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

    @staticmethod
    def _is_erased(session: Session, subject: str) -> bool:
        shredded = session.execute(
            select(AuditBodyKey.shredded_at).where(AuditBodyKey.subject_ref == subject)
        ).scalar_one_or_none()
        return shredded is not None

    # -- bulk import -----------------------------------------------------------------------

    def import_csv(self, *, branch: str, source: str | io.TextIOBase, actor: str) -> ImportSummary:
        """Import a branch's consent CSV, all or nothing.

        Columns: :data:`CSV_REQUIRED_COLUMNS` and optionally :data:`CSV_OPTIONAL_COLUMNS`; any
        other column is refused (a consent file carries pseudonymous ids only). One row is one
        event for one customer and purpose; rows of the same customer and purpose must be in
        chronological order. Every row is checked (fields, then the status rules against the
        store and the earlier rows) before anything is kept.

        Args:
            branch: The branch the file comes from.
            source: The CSV text, or an open text file.
            actor: Who imports it (recorded on every event).

        Returns:
            What was written.

        Raises:
            ConsentValidationError: ``branch`` or ``actor`` is malformed.
            ConsentImportError: Listing every bad row with its line number; nothing was
                written.
        """
        problems: list[str] = []
        _check_name(branch, "branch", problems, _NAME_PATTERN)
        _check_name(actor, "actor", problems, _ACTOR_PATTERN)
        if problems:
            raise ConsentValidationError(problems)
        text_source = io.StringIO(source) if isinstance(source, str) else source
        by_subject, errors, rows = self._parse_csv(text_source, actor)
        if errors and not by_subject:
            raise ConsentImportError(errors)
        parse_errors = list(errors)
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                with transaction(self._factory) as session:
                    batch = _Batch(branch)
                    self._load(session, batch, list(by_subject))
                    errors = list(parse_errors)
                    for subject, changes in by_subject.items():
                        for change in changes:
                            problem = self._plan(batch, subject, change)
                            if problem is not None:
                                errors.append(ImportRowError(change.line, problem))
                    if errors:
                        errors.sort(key=lambda error: error.line)
                        raise ConsentImportError(errors)
                    self._write(session, batch)
            except IntegrityError:
                if attempt == _ATTEMPTS:
                    raise
                continue
            summary = ImportSummary(
                branch, rows, len(batch.new_records), len(batch.planned), len(by_subject)
            )
            logger.info(
                "consent: imported %d row(s), %d customer(s) at branch %s",
                rows,
                len(by_subject),
                branch,
            )
            return summary
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _parse_csv(
        source: io.TextIOBase, actor: str
    ) -> tuple[dict[str, list[_Change]], list[ImportRowError], int]:
        reader = csv.reader(source)
        errors: list[ImportRowError] = []
        try:
            header = [name.strip() for name in next(reader)]
        except StopIteration:
            return {}, [ImportRowError(1, "the file is empty (no header row)")], 0
        except csv.Error as exc:
            return {}, [ImportRowError(1, f"unreadable CSV: {exc}")], 0
        missing = [name for name in CSV_REQUIRED_COLUMNS if name not in header]
        allowed = set(CSV_REQUIRED_COLUMNS) | set(CSV_OPTIONAL_COLUMNS)
        unexpected = [name for name in header if name not in allowed]
        duplicated = sorted({name for name in header if header.count(name) > 1})
        if missing:
            errors.append(ImportRowError(1, f"missing column(s): {', '.join(missing)}"))
        if unexpected:
            errors.append(
                ImportRowError(
                    1,
                    f"unexpected column(s): {', '.join(unexpected)} (a consent file carries "
                    "pseudonymous ids only; allowed: " + ", ".join(sorted(allowed)) + ")",
                )
            )
        if duplicated:
            errors.append(ImportRowError(1, f"duplicated column(s): {', '.join(duplicated)}"))
        if errors:
            return {}, errors, 0
        by_subject: dict[str, list[_Change]] = {}
        rows = 0
        line = reader.line_num
        try:
            for values in reader:
                line = reader.line_num
                if not any(value.strip() for value in values):
                    continue
                rows += 1
                if rows > MAX_IMPORT_ROWS:
                    errors.append(
                        ImportRowError(line, f"more than {MAX_IMPORT_ROWS} rows; split the file")
                    )
                    break
                if len(values) != len(header):
                    errors.append(
                        ImportRowError(line, f"expected {len(header)} fields, found {len(values)}")
                    )
                    continue
                row = dict(zip(header, (value.strip() for value in values), strict=True))
                parsed = _parse_row(row, line, actor)
                if isinstance(parsed, ImportRowError):
                    errors.append(parsed)
                else:
                    by_subject.setdefault(row["customer_id"], []).append(parsed)
        except csv.Error as exc:
            errors.append(ImportRowError(line + 1, f"unreadable CSV: {exc}"))
        if rows == 0 and not errors:
            errors.append(ImportRowError(1, "the file has a header but no rows"))
        return by_subject, errors, rows

    # -- queries ---------------------------------------------------------------------------

    def _view(self, session: Session, record: ConsentRecord) -> ConsentRecordView:
        rows = session.execute(
            select(ConsentEvent)
            .where(ConsentEvent.record_id == record.record_id)
            .order_by(ConsentEvent.occurred_at, ConsentEvent.id)
        ).scalars()
        return ConsentRecordView(
            record_id=record.record_id,
            branch=record.branch,
            subject=record.subject_ref,
            created_at=record.created_at,
            erased=self._is_erased(session, record.subject_ref),
            history=tuple(_row_to_entry(row) for row in rows),
        )

    def record(self, *, branch: str, subject: str) -> ConsentRecordView:
        """Return a customer's record with its whole history.

        Raises:
            ConsentNotFound: The customer has no record at this branch.
        """
        with self._factory() as session:
            record = session.execute(
                select(ConsentRecord).where(
                    ConsentRecord.branch == branch, ConsentRecord.subject_ref == subject
                )
            ).scalar_one_or_none()
            if record is None:
                raise ConsentNotFound(f"no consent record for this customer at branch {branch!r}")
            return self._view(session, record)

    def status(
        self, *, branch: str, subject: str, at: datetime | None = None
    ) -> dict[Purpose, PurposeStatus]:
        """Return the status of every purpose of a customer at ``at`` (default now).

        Raises:
            ConsentNotFound: The customer has no record at this branch.
        """
        return self.record(branch=branch, subject=subject).status_at(self._moment(at))

    def _latest_events(self, at: datetime, purpose: Purpose | None, branch: str | None) -> Any:
        """Subquery: each record's latest event per purpose at ``at`` (row_number() = 1)."""
        rank = (
            func.row_number()
            .over(
                partition_by=(ConsentEvent.record_id, ConsentEvent.purpose),
                order_by=(ConsentEvent.occurred_at.desc(), ConsentEvent.id.desc()),
            )
            .label("rank")
        )
        query = (
            select(
                ConsentRecord.branch,
                ConsentRecord.subject_ref,
                ConsentEvent.purpose,
                ConsentEvent.event,
                ConsentEvent.occurred_at,
                ConsentEvent.expires_at,
                AuditBodyKey.shredded_at,
                rank,
            )
            .join(ConsentRecord, ConsentRecord.record_id == ConsentEvent.record_id)
            .outerjoin(AuditBodyKey, AuditBodyKey.subject_ref == ConsentRecord.subject_ref)
            .where(ConsentEvent.occurred_at <= at)
        )
        if purpose is not None:
            query = query.where(ConsentEvent.purpose == purpose)
        if branch is not None:
            query = query.where(ConsentRecord.branch == branch)
        return query.subquery()

    def valid_for(
        self, branch: str, purpose: Purpose | str, at: datetime | None = None
    ) -> frozenset[str]:
        """Return the pseudonymous ids whose consent for ``purpose`` is valid at ``at``.

        Valid means: latest event at ``at`` is given or renewed, not expired at ``at``, and
        the customer not erased. A purpose the customer never consented to is not valid.

        Args:
            branch: The branch.
            purpose: The run's declared purpose.
            at: The time of the decision (default now), e.g. a round's start.

        Raises:
            ConsentValidationError: Unknown purpose, or a naive ``at``.
        """
        problems: list[str] = []
        chosen = _enum(purpose, Purpose, "purpose", problems)
        if problems:
            raise ConsentValidationError(problems)
        moment = self._moment(at)
        latest = self._latest_events(moment, chosen, branch)
        query = select(latest.c.subject_ref).where(
            latest.c.rank == 1,
            latest.c.event.in_(_VALID),
            or_(latest.c.expires_at.is_(None), latest.c.expires_at > moment),
            latest.c.shredded_at.is_(None),
        )
        with self._factory() as session:
            return frozenset(session.execute(query).scalars())

    def snapshot(
        self, branch: str, purpose: Purpose | str, at: datetime | None = None
    ) -> ConsentSnapshot:
        """Return every known customer's consent state for ``purpose`` at ``at``, in one query.

        The consent gate's view of a branch: which customers are valid, and why the others are
        not (refused, withdrawn, expired, erased). A customer with no event for the purpose is
        absent. The snapshot's version is the audit-log index of the branch's latest consent
        change, so the exact registry state a round used can be proven from the audit log.

        Raises:
            ConsentValidationError: Unknown purpose, or a naive ``at``.
        """
        problems: list[str] = []
        chosen = _enum(purpose, Purpose, "purpose", problems)
        if problems:
            raise ConsentValidationError(problems)
        moment = self._moment(at)
        latest = self._latest_events(moment, chosen, branch)
        query = select(
            latest.c.subject_ref,
            latest.c.event,
            latest.c.occurred_at,
            latest.c.expires_at,
            latest.c.shredded_at,
        ).where(latest.c.rank == 1)
        version_query = (
            select(func.max(ConsentEvent.audit_index))
            .join(ConsentRecord, ConsentRecord.record_id == ConsentEvent.record_id)
            .where(ConsentRecord.branch == branch)
        )
        states: dict[str, str] = {}
        since: dict[str, datetime] = {}
        with self._factory() as session:
            for subject, event, occurred, expires, shredded in session.execute(query):
                status = ConsentStatus(event)
                if shredded is not None:
                    state = "erased"
                elif status.is_valid and (expires is None or expires > moment):
                    state = "valid"
                elif status.is_valid:
                    state = "expired"
                else:
                    state = status.value
                states[subject] = state
                since[subject] = occurred
            version = session.execute(version_query).scalar_one_or_none()
        return ConsentSnapshot(
            branch=branch,
            purpose=chosen,
            at=moment,
            version=-1 if version is None else int(version),
            states=states,
            since=since,
        )

    def coverage(
        self, *, at: datetime | None = None, branch: str | None = None
    ) -> list[CoverageCount]:
        """Return consent counts per branch and purpose at ``at`` (aggregates only, no ids)."""
        moment = self._moment(at)
        latest = self._latest_events(moment, None, branch)
        state = case(
            (latest.c.shredded_at.is_not(None), literal("erased", String)),
            (
                and_(
                    latest.c.event.in_(_VALID),
                    or_(latest.c.expires_at.is_(None), latest.c.expires_at > moment),
                ),
                literal("valid", String),
            ),
            (latest.c.event.in_(_VALID), literal("expired", String)),
            (latest.c.event == ConsentStatus.REFUSED, literal("refused", String)),
            else_=literal("withdrawn", String),
        ).label("state")
        classified = (
            select(latest.c.branch, latest.c.purpose, state).where(latest.c.rank == 1).subquery()
        )
        query = select(
            classified.c.branch, classified.c.purpose, classified.c.state, func.count()
        ).group_by(classified.c.branch, classified.c.purpose, classified.c.state)
        counts: dict[tuple[str, str], dict[str, int]] = {}
        with self._factory() as session:
            for row_branch, row_purpose, row_state, number in session.execute(query):
                counts.setdefault((row_branch, str(row_purpose)), {})[row_state] = number
        result = []
        for (row_branch, row_purpose), by_state in sorted(counts.items()):
            result.append(
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
            )
        return result

    def branches(self) -> list[str]:
        """Return every branch with at least one consent record."""
        with self._factory() as session:
            return list(
                session.execute(
                    select(ConsentRecord.branch).distinct().order_by(ConsentRecord.branch)
                ).scalars()
            )

    def erase(self, *, branch: str, subject: str, reason: str) -> None:
        """Erase a customer: destroy their audit key (crypto-shredding); consent becomes invalid.

        Raises:
            ConsentNotFound: The customer has no record at this branch.
            SubjectShredded: The customer was already erased.
        """
        self.record(branch=branch, subject=subject)
        self._audit.shred_subject(subject, reason=reason)

    def receipt(self, *, branch: str, subject: str, at: datetime | None = None) -> dict[str, Any]:
        """Return the customer's consent receipt: plain JSON data to hand to the customer.

        It lists every purpose with its status, legal basis, notice and expiry, the whole
        history, and the audit-log indices of the events with the latest signed checkpoint,
        so the customer (or anyone they trust) can ask for inclusion proofs later.

        Raises:
            ConsentNotFound: The customer has no record at this branch.
        """
        moment = self._moment(at)
        view = self.record(branch=branch, subject=subject)
        checkpoint = self._audit.latest_checkpoint()
        return {
            "receipt_version": RECEIPT_VERSION,
            "issued_at": _fmt(moment),
            "record_id": view.record_id,
            "branch": view.branch,
            "customer_id": view.subject,
            "erased": view.erased,
            "purposes": [s.to_json() for _, s in sorted(view.status_at(moment).items())],
            "history": [entry.to_json() for entry in view.history],
            "audit": {
                "entries": [entry.audit_index for entry in view.history],
                "latest_checkpoint": None if checkpoint is None else checkpoint.to_json(),
            },
            "withdrawal": (
                "You can withdraw any consent at any time, as easily as you gave it, at your "
                "branch or through any channel listed here; processing stops from then on."
            ),
        }


def _parse_row(row: dict[str, str], line: int, actor: str) -> _Change | ImportRowError:
    problems: list[str] = []
    _check_subject(row["customer_id"], problems)
    purpose = _enum(row["purpose"], Purpose, "purpose", problems)
    status = _enum(row["status"], ConsentStatus, "status", problems)
    if status is not None and status not in CSV_IMPORTABLE_STATUSES:
        allowed = ", ".join(sorted(s.value for s in CSV_IMPORTABLE_STATUSES))
        problems.append(f"status must be one of {allowed}; got {row['status']!r}")
    basis = _enum(row["legal_basis"], LegalBasis, "legal_basis", problems)
    channel = _enum(row["channel"], Channel, "channel", problems)
    method = _enum(
        row.get("collection_method") or CollectionMethod.BRANCH_IMPORT,
        CollectionMethod,
        "collection_method",
        problems,
    )
    occurred = _parse_time(row["occurred_at"], "occurred_at", problems)
    expires = (
        _parse_time(row["expires_at"], "expires_at", problems) if row.get("expires_at") else None
    )
    if occurred is not None and expires is not None and expires <= occurred:
        problems.append("expires_at must be after occurred_at")
    if expires is not None and status is not None and not status.is_valid:
        problems.append(f"expires_at applies only to given or renewed consent, not {status}")
    notice: Notice | None = None
    try:
        notice = Notice(row["notice_id"], row["notice_version"], row["notice_hash"])
    except ConsentError as exc:
        problems.extend(getattr(exc, "problems", [str(exc)]))
    if problems or occurred is None or purpose is None or status is None or channel is None:
        return ImportRowError(line, "; ".join(problems))
    return _Change(
        purpose=purpose,
        event=status,
        legal_basis=basis,
        occurred_at=occurred,
        expires_at=expires,
        actor=actor,
        channel=channel,
        collection_method=method,
        notice=notice,
        line=line,
    )
