"""What the consent registry returns: notices, history events, statuses, records, counts."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fedcrm.compliance._types import utcnow
from fedcrm.compliance.audit._signing import SignedCheckpoint
from fedcrm.compliance.consent._checks import NAME, check_name, format_time
from fedcrm.compliance.enums import Channel, CollectionMethod, ConsentStatus, LegalBasis, Purpose
from fedcrm.compliance.errors import ConsentValidationError

RECEIPT_VERSION = 1
"""Version of the JSON consent receipt layout."""

_HASH = re.compile(r"[0-9a-f]{64}")


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
        check_name(self.notice_id, "notice_id", problems, NAME)
        if not isinstance(self.version, str) or not 0 < len(self.version.strip()) <= 64:
            problems.append("notice_version must be a non-empty string of at most 64 characters")
        if not isinstance(self.sha256, str) or not _HASH.fullmatch(self.sha256):
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
            "occurred_at": format_time(self.occurred_at),
            "expires_at": format_time(self.expires_at),
            "actor": self.actor,
            "channel": self.channel.value,
            "collection_method": self.collection_method.value,
            "notice": self.notice.to_json(),
            "audit_index": self.audit_index,
            "recorded_at": format_time(self.recorded_at),
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
            "since": format_time(self.since),
            "expires_at": format_time(self.expires_at),
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


def receipt(
    view: ConsentRecordView, at: datetime, checkpoint: SignedCheckpoint | None
) -> dict[str, Any]:
    """Return the JSON consent receipt of a record at ``at``, with the latest signed checkpoint."""
    return {
        "receipt_version": RECEIPT_VERSION,
        "issued_at": format_time(at),
        "record_id": view.record_id,
        "branch": view.branch,
        "customer_id": view.subject,
        "erased": view.erased,
        "purposes": [s.to_json() for _, s in sorted(view.status_at(at).items())],
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
