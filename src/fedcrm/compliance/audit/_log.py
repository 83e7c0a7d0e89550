"""The audit log stored in the compliance database.

Implementation based on RFC 9162 §2.1 (Merkle tree, proofs) and §4.9-4.10 (signed tree heads);
see :mod:`fedcrm.compliance.audit._merkle` and :mod:`fedcrm.compliance.audit._signing`.

Notes:
    Appending is one database transaction: the head row ``audit_log_state`` is locked
    (``SELECT ... FOR UPDATE``; ``BEGIN IMMEDIATE`` on SQLite), the subject's key is created if
    needed, the entry is inserted and the tree size advanced, or nothing at all is written.
    Before signing a checkpoint every leaf hash is recomputed from the stored entry and the new
    tree is checked against the previous checkpoint, so the log never signs over tampering.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from fedcrm.compliance._types import utcnow
from fedcrm.compliance.audit._events import (
    AuditEvent,
    LogEntry,
    new_body_key,
    new_key_id,
    open_body,
    seal,
    validate_subject_ref,
)
from fedcrm.compliance.audit._merkle import MerkleTree, verify_consistency, verify_inclusion
from fedcrm.compliance.audit._signing import Checkpoint, SignedCheckpoint, sign_checkpoint
from fedcrm.compliance.audit._verify import (
    CheckpointRecord,
    EntryRecord,
    VerificationReport,
    verify_records,
    write_export,
)
from fedcrm.compliance.db import transaction
from fedcrm.compliance.enums import EventType, KeyScope
from fedcrm.compliance.errors import (
    AuditError,
    AuditIntegrityError,
    ProofError,
    SubjectShredded,
)
from fedcrm.compliance.models import AuditBodyKey, AuditCheckpoint, AuditEntry, AuditLogState

logger = logging.getLogger(__name__)

QUERY_CHUNK = 900
"""Largest number of bound values in one ``IN (...)`` list (below every backend's limit)."""

INSERT_CHUNK = 2000
"""Rows per bulk ``INSERT`` statement batch."""


@dataclass(frozen=True, slots=True)
class InclusionProof:
    """Proof that one entry is in the tree of a given size (RFC 9162 §2.1.3).

    ``leaf_hash`` is recomputed from the stored entry, so an altered entry gives a proof that
    fails against any root signed before the alteration.
    """

    index: int
    tree_size: int
    leaf_hash: bytes
    path: tuple[bytes, ...]

    def verify(self, root_hash: bytes) -> None:
        """Verify against a trusted root (RFC 9162 §2.1.3.2).

        Raises:
            ProofError: The entry is not in the tree with that root.
        """
        verify_inclusion(self.leaf_hash, self.index, self.tree_size, self.path, root_hash)

    def to_json(self) -> dict[str, Any]:
        """Return the proof as a JSON object (hex hashes)."""
        return {
            "leaf_index": self.index,
            "tree_size": self.tree_size,
            "leaf_hash": self.leaf_hash.hex(),
            "inclusion_path": [node.hex() for node in self.path],
        }


@dataclass(frozen=True, slots=True)
class ConsistencyProof:
    """Proof that the tree of size ``second`` extends the tree of size ``first`` (§2.1.4)."""

    first: int
    second: int
    path: tuple[bytes, ...]

    def verify(self, first_root: bytes, second_root: bytes) -> None:
        """Verify against the two trusted roots (RFC 9162 §2.1.4.2).

        Raises:
            ProofError: The later tree does not extend the earlier one.
        """
        verify_consistency(self.first, self.second, first_root, second_root, self.path)

    def to_json(self) -> dict[str, Any]:
        """Return the proof as a JSON object (hex hashes)."""
        return {
            "first": self.first,
            "second": self.second,
            "consistency_path": [node.hex() for node in self.path],
        }


def _to_entry(row: AuditEntry) -> LogEntry:
    return LogEntry(
        index=row.seq,
        event_type=EventType(row.event_type),
        subject=row.subject_ref,
        time=row.time,
        key_id=row.key_id,
        algorithm=row.algorithm,
        nonce=row.nonce,
        ciphertext=row.ciphertext,
    )


def _to_checkpoint(row: AuditCheckpoint) -> SignedCheckpoint:
    return SignedCheckpoint(
        checkpoint=Checkpoint(
            tree_size=row.tree_size, root_hash=row.root_hash, timestamp_ms=row.timestamp_ms
        ),
        public_key=row.public_key,
        signature=row.signature,
    )


class AuditLog:
    """Append-only, tamper-evident audit log over the compliance store.

    Args:
        session_factory: From :func:`fedcrm.compliance.db.open_store` (schema at head).

    Example:
        >>> from fedcrm.compliance.audit import AuditEvent, AuditLog, EventType
        >>> log = AuditLog(factory)  # doctest: +SKIP
        >>> log.append(AuditEvent(EventType.CONFIGURATION_CHANGE, {"rounds": 20}))  # doctest: +SKIP
    """

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._factory = session_factory

    # -- appending -------------------------------------------------------------------------

    def append(self, event: AuditEvent, *, session: Session | None = None) -> LogEntry:
        """Append one event and return its stored entry.

        Args:
            event: The event; its body is encrypted with the subject's key (created on first
                use) or, without a subject, with the log-level key.
            session: Join the caller's transaction (e.g. a ledger append, so that the ledger
                row and its audit event commit together); the caller commits. Without it the
                append is its own transaction.

        Raises:
            SubjectShredded: The subject's key was destroyed; log the event without a subject.
        """
        if session is not None:
            return self._append(session, event, log_key=event.subject is None)
        with transaction(self._factory) as own:
            entry = self._append(own, event, log_key=event.subject is None)
        logger.debug("audit: appended entry %d (%s)", entry.index, entry.event_type)
        return entry

    def append_many(
        self, events: Sequence[AuditEvent], *, session: Session | None = None
    ) -> list[LogEntry]:
        """Append events in log order, in one pass, and return their stored entries.

        The same as :meth:`append` for each event in turn (same leaves, same keys), but the
        log head is locked once, every subject's key is read (or created) by one query per
        :data:`QUERY_CHUNK` subjects, and the entries are inserted together: a bulk import of
        thousands of events costs a handful of statements instead of several per event.

        Args:
            events: The events, in the order they take in the log.
            session: Join the caller's transaction (the caller commits); without it the
                append is its own transaction. Either way it is all or nothing.

        Raises:
            SubjectShredded: A subject's key was destroyed; nothing is appended.
        """
        if session is not None:
            return self._append_many(session, events, log_key=False)
        with transaction(self._factory) as own:
            entries = self._append_many(own, events, log_key=False)
        logger.debug("audit: appended %d entries", len(entries))
        return entries

    @staticmethod
    def _lock_state(session: Session) -> AuditLogState:
        state = session.execute(
            select(AuditLogState).where(AuditLogState.id == 1).with_for_update()
        ).scalar_one_or_none()
        if state is None:
            raise AuditIntegrityError(
                "the audit_log_state row is missing: the store was not created by the migrations"
            )
        return state

    @staticmethod
    def _key_row(session: Session, subject: str | None) -> AuditBodyKey:
        if subject is None:
            query = select(AuditBodyKey).where(AuditBodyKey.scope == KeyScope.LOG)
        else:
            query = select(AuditBodyKey).where(AuditBodyKey.subject_ref == subject)
        row = session.execute(query).scalar_one_or_none()
        if row is None:
            row = AuditBodyKey(
                key_id=new_key_id(),
                scope=KeyScope.LOG if subject is None else KeyScope.SUBJECT,
                subject_ref=subject,
                key_material=new_body_key(),
                created_at=utcnow(),
                shredded_at=None,
            )
            session.add(row)
            session.flush()
        return row

    @staticmethod
    def _body_keys(
        session: Session, subjects: Collection[str | None]
    ) -> dict[str | None, tuple[str, bytes | None]]:
        """Return ``(key id, key or None if shredded)`` per subject (None: the log key).

        Keys are read in chunks of :data:`QUERY_CHUNK` subjects and the missing ones created
        with one bulk insert.
        """
        keys: dict[str | None, tuple[str, bytes | None]] = {}
        if None in subjects:
            row = AuditLog._key_row(session, None)
            keys[None] = (row.key_id, row.key_material)
        named = sorted(subject for subject in subjects if subject is not None)
        for start in range(0, len(named), QUERY_CHUNK):
            chunk = named[start : start + QUERY_CHUNK]
            query = select(
                AuditBodyKey.subject_ref, AuditBodyKey.key_id, AuditBodyKey.key_material
            ).where(AuditBodyKey.subject_ref.in_(chunk))
            for subject, key_id, material in session.execute(query):
                keys[subject] = (key_id, material)
        fresh = {
            subject: (new_key_id(), new_body_key()) for subject in named if subject not in keys
        }
        if fresh:
            now = utcnow()
            session.execute(
                insert(AuditBodyKey),
                [
                    {
                        "key_id": key_id,
                        "scope": KeyScope.SUBJECT,
                        "subject_ref": subject,
                        "key_material": material,
                        "created_at": now,
                        "shredded_at": None,
                    }
                    for subject, (key_id, material) in fresh.items()
                ],
            )
            keys.update(fresh)
        return keys

    def _append(self, session: Session, event: AuditEvent, *, log_key: bool) -> LogEntry:
        return self._append_many(session, [event], log_key=log_key)[0]

    def _append_many(
        self, session: Session, events: Sequence[AuditEvent], *, log_key: bool
    ) -> list[LogEntry]:
        """Append ``events`` under one lock of the log head.

        With ``log_key`` every body is encrypted under the log key (as the key-destruction
        event needs); otherwise under its subject's key, or the log key when it has none.
        """
        if not events:
            return []
        state = self._lock_state(session)
        owners = [None if log_key else event.subject for event in events]
        sealing: dict[str | None, tuple[str, bytes]] = {}
        for owner, (key_id, material) in self._body_keys(session, set(owners)).items():
            if material is None:
                raise SubjectShredded(
                    "the body key of this subject was destroyed (crypto-shredded); events "
                    "about an erased subject cannot be logged under their key"
                )
            sealing[owner] = (key_id, material)
        entries: list[LogEntry] = []
        rows: list[dict[str, Any]] = []
        for offset, (event, owner) in enumerate(zip(events, owners, strict=True)):
            key_id, material = sealing[owner]
            entry = seal(event, index=state.tree_size + offset, key_id=key_id, key=material)
            entries.append(entry)
            rows.append(
                {
                    "seq": entry.index,
                    "event_type": entry.event_type,
                    "subject_ref": entry.subject,
                    "time": entry.time,
                    "key_id": entry.key_id,
                    "algorithm": entry.algorithm,
                    "nonce": entry.nonce,
                    "ciphertext": entry.ciphertext,
                    "leaf_hash": entry.leaf_hash(),
                }
            )
        for start in range(0, len(rows), INSERT_CHUNK):
            session.execute(insert(AuditEntry), rows[start : start + INSERT_CHUNK])
        state.tree_size += len(entries)
        session.flush()
        return entries

    # -- crypto-shredding ------------------------------------------------------------------

    def shred_subject(self, subject: str, *, reason: str) -> LogEntry:
        """Destroy a subject's body key (crypto-shredding) and log the destruction.

        Every body encrypted for the subject becomes undecryptable; every leaf, proof and
        checkpoint stays valid because leaves commit to ciphertexts. The destruction itself is
        logged as a ``key-destruction`` event naming the subject's pseudonym, its body
        (key id, reason) encrypted under the log-level key. Later events about the subject are
        refused (:class:`SubjectShredded`).

        Args:
            subject: The pseudonymous reference of the subject to erase.
            reason: Why (e.g. the erasure request id); stored encrypted under the log key.

        Returns:
            The ``key-destruction`` entry.

        Raises:
            SubjectShredded: The subject's key was already destroyed.
        """
        validate_subject_ref(subject)
        with transaction(self._factory) as session:
            self._lock_state(session)
            row = self._key_row(session, subject)
            if row.key_material is None:
                raise SubjectShredded("this subject's body key was already destroyed")
            now = utcnow()
            row.key_material = None
            row.shredded_at = now
            session.flush()
            entry = self._append(
                session,
                AuditEvent(
                    EventType.KEY_DESTRUCTION,
                    {"key_id": row.key_id, "reason": reason},
                    subject=subject,
                    time=now,
                ),
                log_key=True,
            )
        logger.info("audit: body key destroyed (entry %d)", entry.index)
        return entry

    def is_shredded(self, subject: str) -> bool:
        """Return whether the subject's body key was destroyed."""
        with self._factory() as session:
            row = session.execute(
                select(AuditBodyKey).where(AuditBodyKey.subject_ref == subject)
            ).scalar_one_or_none()
            return row is not None and row.key_material is None

    # -- reading ---------------------------------------------------------------------------

    def size(self) -> int:
        """Return the number of entries in the log."""
        with self._factory() as session:
            state = session.get(AuditLogState, 1)
            if state is None:
                raise AuditIntegrityError("the audit_log_state row is missing")
            return state.tree_size

    def entry(self, index: int) -> LogEntry:
        """Return the stored entry at ``index``.

        Raises:
            AuditError: There is no such entry.
        """
        with self._factory() as session:
            row = session.get(AuditEntry, index)
            if row is None:
                raise AuditError(f"no audit entry with index {index}")
            return _to_entry(row)

    def entries(self, start: int = 0, end: int | None = None) -> list[LogEntry]:
        """Return the entries with ``start <= index < end`` in log order."""
        with self._factory() as session:
            query = select(AuditEntry).where(AuditEntry.seq >= start).order_by(AuditEntry.seq)
            if end is not None:
                query = query.where(AuditEntry.seq < end)
            return [_to_entry(row) for row in session.execute(query).scalars()]

    def read_body(self, index: int) -> dict[str, Any]:
        """Decrypt and return the body of entry ``index``.

        Raises:
            AuditError: There is no such entry.
            BodyUnavailable: Its key was shredded, or the entry was altered.
        """
        with self._factory() as session:
            row = session.get(AuditEntry, index)
            if row is None:
                raise AuditError(f"no audit entry with index {index}")
            key_row = session.get(AuditBodyKey, row.key_id)
            key = None if key_row is None else key_row.key_material
            return open_body(_to_entry(row), key)

    # -- tree, proofs, checkpoints ---------------------------------------------------------

    def _stored_tree(self, session: Session) -> MerkleTree:
        hashes = session.execute(select(AuditEntry.leaf_hash).order_by(AuditEntry.seq)).scalars()
        return MerkleTree(list(hashes))

    def root(self, tree_size: int | None = None) -> bytes:
        """Return ``MTH`` of the first ``tree_size`` entries (default: all), RFC 9162 §2.1.1."""
        with self._factory() as session:
            return self._stored_tree(session).root(tree_size)

    def inclusion_proof(self, index: int, tree_size: int | None = None) -> InclusionProof:
        """Return the inclusion proof of entry ``index`` in the tree of ``tree_size`` entries.

        Raises:
            AuditError: ``index`` or ``tree_size`` is out of range.
        """
        with self._factory() as session:
            tree = self._stored_tree(session)
            size = tree.size if tree_size is None else tree_size
            try:
                path = tree.inclusion_proof(index, size)
            except ValueError as exc:
                raise AuditError(str(exc)) from exc
            row = session.get(AuditEntry, index)
            if row is None:  # pragma: no cover - the tree was read in the same session
                raise AuditError(f"no audit entry with index {index}")
            return InclusionProof(index, size, _to_entry(row).leaf_hash(), tuple(path))

    def consistency_proof(self, first: int, second: int | None = None) -> ConsistencyProof:
        """Return the proof that the tree of ``second`` entries extends that of ``first``.

        Raises:
            AuditError: The sizes are out of range.
        """
        with self._factory() as session:
            tree = self._stored_tree(session)
            size = tree.size if second is None else second
            try:
                path = tree.consistency_proof(first, size)
            except ValueError as exc:
                raise AuditError(str(exc)) from exc
            return ConsistencyProof(first, size, tuple(path))

    def checkpoint(
        self, key: Ed25519PrivateKey, *, now: datetime | None = None
    ) -> SignedCheckpoint:
        """Sign and store a checkpoint of the whole log (RFC 9162 §4.10).

        Args:
            key: The log's Ed25519 signing key.
            now: Checkpoint time (aware); defaults to now.

        Raises:
            AuditIntegrityError: A stored entry no longer matches its leaf hash, the entries
                are not contiguous, the tree does not extend the previous checkpoint, or time
                went backwards; nothing is signed.
            ValueError: ``now`` is a naive datetime.
        """
        moment = utcnow() if now is None else now
        if moment.utcoffset() is None:
            raise ValueError("the checkpoint time must be timezone-aware")
        timestamp_ms = math.floor(moment.timestamp() * 1000)
        with transaction(self._factory) as session:
            state = self._lock_state(session)
            rows = session.execute(select(AuditEntry).order_by(AuditEntry.seq)).scalars().all()
            tree = self._checked_tree(rows, state.tree_size)
            previous = session.execute(
                select(AuditCheckpoint).order_by(AuditCheckpoint.id.desc()).limit(1)
            ).scalar_one_or_none()
            if previous is not None:
                self._check_extends(tree, _to_checkpoint(previous))
                if timestamp_ms < previous.timestamp_ms:
                    raise AuditIntegrityError(
                        "the clock is behind the previous checkpoint; refusing to sign a "
                        "checkpoint that goes back in time"
                    )
            signed = sign_checkpoint(Checkpoint(tree.size, tree.root(), timestamp_ms), key)
            session.add(
                AuditCheckpoint(
                    tree_size=signed.tree_size,
                    root_hash=signed.root_hash,
                    timestamp_ms=timestamp_ms,
                    key_id=signed.key_id,
                    public_key=signed.public_key,
                    signature=signed.signature,
                )
            )
        logger.info("audit: signed checkpoint at tree size %d", signed.tree_size)
        return signed

    @staticmethod
    def _checked_tree(rows: Sequence[AuditEntry], expected_size: int) -> MerkleTree:
        if len(rows) != expected_size:
            raise AuditIntegrityError(
                f"the log head says {expected_size} entries but {len(rows)} are stored"
            )
        tree = MerkleTree()
        for position, row in enumerate(rows):
            if row.seq != position:
                raise AuditIntegrityError(f"entry {position} is missing (found index {row.seq})")
            recomputed = _to_entry(row).leaf_hash()
            if recomputed != row.leaf_hash:
                raise AuditIntegrityError(
                    f"entry {row.seq} no longer matches its leaf hash: it was altered"
                )
            tree.append(recomputed)
        return tree

    @staticmethod
    def _check_extends(tree: MerkleTree, previous: SignedCheckpoint) -> None:
        if previous.tree_size > tree.size:
            raise AuditIntegrityError(
                f"the log has {tree.size} entries, fewer than the {previous.tree_size} of the "
                "last checkpoint: entries were removed"
            )
        proof = tree.consistency_proof(previous.tree_size, tree.size)
        try:
            verify_consistency(
                previous.tree_size, tree.size, previous.root_hash, tree.root(), proof
            )
        except ProofError as exc:
            raise AuditIntegrityError(
                f"the log is not consistent with its last checkpoint (size "
                f"{previous.tree_size}): {exc}"
            ) from exc

    def checkpoints(self) -> list[SignedCheckpoint]:
        """Return every stored checkpoint, oldest first."""
        with self._factory() as session:
            rows = session.execute(select(AuditCheckpoint).order_by(AuditCheckpoint.id)).scalars()
            return [_to_checkpoint(row) for row in rows]

    def latest_checkpoint(self) -> SignedCheckpoint | None:
        """Return the newest stored checkpoint, or None."""
        with self._factory() as session:
            row = session.execute(
                select(AuditCheckpoint).order_by(AuditCheckpoint.id.desc()).limit(1)
            ).scalar_one_or_none()
            return None if row is None else _to_checkpoint(row)

    # -- export and verification -----------------------------------------------------------

    def _snapshot(self) -> tuple[list[tuple[LogEntry, bytes]], list[SignedCheckpoint]]:
        with transaction(self._factory) as session:
            self._lock_state(session)
            rows = session.execute(select(AuditEntry).order_by(AuditEntry.seq)).scalars().all()
            entries = [(_to_entry(row), row.leaf_hash) for row in rows]
            checkpoints = [
                _to_checkpoint(row)
                for row in session.execute(
                    select(AuditCheckpoint).order_by(AuditCheckpoint.id)
                ).scalars()
            ]
        return entries, checkpoints

    def export(self, path: Path) -> Path:
        """Write the whole log to a self-contained JSON-lines file for offline verification.

        The file holds every entry (ciphertexts, never plaintext bodies), every signed
        checkpoint and the public keys; see :func:`fedcrm.compliance.audit.verify_export`.

        Returns:
            ``path``.
        """
        entries, checkpoints = self._snapshot()
        write_export(path, entries, checkpoints)
        logger.info("audit: exported %d entries and %d checkpoints", len(entries), len(checkpoints))
        return path

    def verify(
        self,
        since_checkpoint: SignedCheckpoint | None = None,
        *,
        trusted_keys: Collection[bytes] | None = None,
    ) -> VerificationReport:
        """Verify the stored log as the offline verifier would verify its export."""
        entries, checkpoints = self._snapshot()
        return verify_records(
            [EntryRecord(entry.to_json(), stored.hex()) for entry, stored in entries],
            [CheckpointRecord(cp.to_json()) for cp in checkpoints],
            since_checkpoint=since_checkpoint,
            trusted_keys=trusted_keys,
            source="database",
        )
