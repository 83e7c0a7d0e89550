"""Audit events, their encrypted bodies and the canonical leaf encoding.

A leaf (the entry ``d(i)`` of RFC 9162 §2.1) is the canonical JSON of the entry's public fields:
its index, event type, pseudonymous subject reference (or ``null``), time, key id, AEAD
algorithm, nonce and ciphertext. The body itself is never in the clear in the log: it is
encrypted with AES-256-GCM under the subject's key (or the log-level key) with the leaf header as
associated data, so a body cannot be moved to another entry. Because the leaf commits to the
*ciphertext*, destroying a subject's key (crypto-shredding) makes the body unreadable while every
leaf hash, and so every proof and signed checkpoint, stays valid.

Canonical JSON here means ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
ensure_ascii=True, allow_nan=False)`` encoded as UTF-8, with bytes as standard base64 and times
as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``; an auditor can recompute every leaf from an export with any
JSON library.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedcrm.compliance._types import utcnow
from fedcrm.compliance.audit._merkle import leaf_hash
from fedcrm.compliance.enums import EventType
from fedcrm.compliance.errors import AuditError, BodyUnavailable, ExportFormatError, malformed_as

LEAF_FORMAT_VERSION = 1
"""Version of the leaf encoding, stored in every leaf as ``"v"``."""

BODY_ALGORITHM = "AES-256-GCM"
"""AEAD used for event bodies (NIST SP 800-38D), 256-bit keys and 96-bit random nonces."""

BODY_KEY_BYTES = 32
NONCE_BYTES = 12
_AAD_CONTEXT = b"fedcrm-audit-body-v1\x00"
_SUBJECT_PATTERN = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")


def canonical_json(value: Any) -> bytes:
    """Serialise ``value`` as canonical JSON bytes (see the module docstring).

    Raises:
        AuditError: ``value`` is not JSON-serialisable (or holds NaN or infinity).
    """
    try:
        text = json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise AuditError(f"an audit body must be plain JSON data: {exc}") from exc
    return text.encode("utf-8")


def b64encode(data: bytes) -> str:
    """Encode bytes as standard base64 text."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, *, what: str) -> bytes:
    """Decode standard base64 text strictly.

    Raises:
        ExportFormatError: ``text`` is not valid base64.
    """
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ExportFormatError(f"{what} is not valid base64") from exc


def format_time(value: datetime) -> str:
    """Render an aware datetime as RFC 3339 UTC with microseconds (``...Z``)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("audit times must be timezone-aware")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """Parse a time written by :func:`format_time`.

    Raises:
        ExportFormatError: ``text`` is not in that format.
    """
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError as exc:
        raise ExportFormatError(f"invalid audit time {text!r}") from exc


def validate_subject_ref(subject: str | None) -> None:
    """Check that a subject reference looks like a pseudonym, not raw personal data.

    Args:
        subject: A pseudonymous reference (e.g. ``fedcrm.data.pseudonymise`` output), or None.

    Raises:
        ValueError: It is empty, too long, or has characters a pseudonym never has (spaces,
            ``@`` and the like suggest a name or an e-mail address).
    """
    if subject is not None and not _SUBJECT_PATTERN.fullmatch(subject):
        raise ValueError(
            "a subject reference must be a pseudonym of 1-128 characters from [A-Za-z0-9_.:-] "
            "(never a name, e-mail address or raw customer id)"
        )


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """An event to append to the audit log.

    Args:
        event_type: What happened.
        body: The details, as plain JSON data; stored only encrypted.
        subject: Pseudonymous reference of the data subject the event concerns, or None for
            events about no one (the body is then encrypted with the log-level key).
        time: When it happened (aware datetime); defaults to now, UTC.
    """

    event_type: EventType
    body: Mapping[str, Any]
    subject: str | None = None
    time: datetime = field(default_factory=utcnow)

    def __post_init__(self) -> None:
        # Accept the plain string value too (e.g. from JSON), and refuse unknown types early.
        object.__setattr__(self, "event_type", EventType(self.event_type))
        validate_subject_ref(self.subject)
        if self.time.tzinfo is None or self.time.utcoffset() is None:
            raise ValueError("AuditEvent.time must be timezone-aware")
        canonical_json(dict(self.body))  # fail early on a body that cannot be stored


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One stored leaf of the audit log: public fields and the encrypted body.

    ``leaf_data()`` is the entry ``d(i)`` of RFC 9162 §2.1 and ``leaf_hash()`` its leaf hash.
    """

    index: int
    event_type: EventType
    subject: str | None
    time: datetime
    key_id: str
    algorithm: str
    nonce: bytes
    ciphertext: bytes

    def header(self) -> dict[str, Any]:
        """Return the fields bound to the body as associated data (everything but the body)."""
        return {
            "alg": self.algorithm,
            "key": self.key_id,
            "seq": self.index,
            "subject": self.subject,
            "time": format_time(self.time),
            "type": str(self.event_type),
            "v": LEAF_FORMAT_VERSION,
        }

    def associated_data(self) -> bytes:
        """Return the AEAD associated data: a context label and the canonical header."""
        return _AAD_CONTEXT + canonical_json(self.header())

    def leaf_data(self) -> bytes:
        """Return the canonical leaf encoding ``d(i)`` (header, nonce and ciphertext)."""
        leaf = self.header()
        leaf["nonce"] = b64encode(self.nonce)
        leaf["ct"] = b64encode(self.ciphertext)
        return canonical_json(leaf)

    def leaf_hash(self) -> bytes:
        """Return ``SHA-256(0x00 || d(i))`` (RFC 9162 §2.1.1)."""
        return leaf_hash(self.leaf_data())

    def to_json(self) -> dict[str, Any]:
        """Return the entry as a JSON object (the leaf fields plus the index)."""
        data = self.header()
        data["nonce"] = b64encode(self.nonce)
        data["ct"] = b64encode(self.ciphertext)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LogEntry:
        """Rebuild an entry from :meth:`to_json` output.

        Raises:
            ExportFormatError: A field is missing or has the wrong type or format.
        """
        with malformed_as(ExportFormatError, "audit entry"):
            if data["v"] != LEAF_FORMAT_VERSION:
                raise ExportFormatError(f"unknown leaf format version {data['v']!r}")
            index = data["seq"]
            subject = data["subject"]
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise ExportFormatError(f"invalid entry index {index!r}")
            if subject is not None and not isinstance(subject, str):
                raise ExportFormatError(f"entry {index}: invalid subject reference")
            return cls(
                index=index,
                event_type=EventType(data["type"]),
                subject=subject,
                time=parse_time(str(data["time"])),
                key_id=str(data["key"]),
                algorithm=str(data["alg"]),
                nonce=b64decode(str(data["nonce"]), what=f"entry {index} nonce"),
                ciphertext=b64decode(str(data["ct"]), what=f"entry {index} ciphertext"),
            )


def new_body_key() -> bytes:
    """Return a fresh random AES-256 body key."""
    return AESGCM.generate_key(bit_length=8 * BODY_KEY_BYTES)


def new_key_id() -> str:
    """Return a fresh random key identifier (32 hex characters, reveals nothing)."""
    return secrets.token_hex(16)


def seal(event: AuditEvent, *, index: int, key_id: str, key: bytes) -> LogEntry:
    """Encrypt an event's body and return the log entry for leaf ``index``.

    Args:
        event: The event to store.
        index: Its leaf index in the log.
        key_id: Identifier of ``key`` (stored in the leaf).
        key: The 32-byte AES key of the event's subject (or of the log).
    """
    nonce = secrets.token_bytes(NONCE_BYTES)
    draft = LogEntry(
        index=index,
        event_type=event.event_type,
        subject=event.subject,
        time=event.time.astimezone(UTC),
        key_id=key_id,
        algorithm=BODY_ALGORITHM,
        nonce=nonce,
        ciphertext=b"",
    )
    ciphertext = AESGCM(key).encrypt(
        nonce, canonical_json(dict(event.body)), draft.associated_data()
    )
    return LogEntry(
        index=draft.index,
        event_type=draft.event_type,
        subject=draft.subject,
        time=draft.time,
        key_id=key_id,
        algorithm=BODY_ALGORITHM,
        nonce=nonce,
        ciphertext=ciphertext,
    )


def open_body(entry: LogEntry, key: bytes | None) -> dict[str, Any]:
    """Decrypt and parse an entry's body.

    Args:
        entry: The stored entry.
        key: Its body key, or None when the key was shredded.

    Raises:
        BodyUnavailable: The key was shredded, or the ciphertext or header was altered.
    """
    if key is None:
        raise BodyUnavailable(
            f"entry {entry.index}: the body key was destroyed (crypto-shredded); "
            "the entry still verifies but its body can no longer be read"
        )
    if entry.algorithm != BODY_ALGORITHM:
        raise BodyUnavailable(f"entry {entry.index}: unknown body algorithm {entry.algorithm!r}")
    try:
        plaintext = AESGCM(key).decrypt(entry.nonce, entry.ciphertext, entry.associated_data())
    except InvalidTag as exc:
        raise BodyUnavailable(
            f"entry {entry.index}: the body does not authenticate (wrong key, or the entry "
            "was altered)"
        ) from exc
    body = json.loads(plaintext)
    if not isinstance(body, dict):  # pragma: no cover - seal() only writes objects
        raise BodyUnavailable(f"entry {entry.index}: the body is not a JSON object")
    return body
