"""The audit log in the store: appends, proofs, checkpoints, tampering and crypto-shredding."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from fedcrm.compliance import (
    AuditError,
    AuditIntegrityError,
    BodyUnavailable,
    EventType,
    ProofError,
    SubjectShredded,
    transaction,
)
from fedcrm.compliance.audit import AuditEvent, AuditLog, IssueKind
from fedcrm.compliance.models import AuditBodyKey, AuditEntry

ALICE = "p_" + "a" * 32
BOB = "p_" + "b" * 32


def fill(log: AuditLog, n: int) -> None:
    for i in range(n):
        subject = (ALICE, BOB, None)[i % 3]
        log.append(AuditEvent(EventType.CONSENT_CHANGE, {"i": i, "status": "given"}, subject))


def flip_byte(store: sessionmaker[Session], seq: int, column: str) -> None:
    with transaction(store) as session:
        row = session.get(AuditEntry, seq)
        assert row is not None
        if column == "subject_ref":
            value: str | bytes = "p_" + "c" * 32
        else:
            raw = bytearray(getattr(row, column))
            raw[len(raw) // 2] ^= 0x01
            value = bytes(raw)
        session.execute(update(AuditEntry).where(AuditEntry.seq == seq).values({column: value}))


def test_append_read_and_proofs(audit_log: AuditLog, signing_key: Ed25519PrivateKey) -> None:
    fill(audit_log, 7)
    assert audit_log.size() == 7
    assert audit_log.read_body(4) == {"i": 4, "status": "given"}
    assert [e.index for e in audit_log.entries(2, 5)] == [2, 3, 4]
    assert audit_log.entry(1).subject == BOB
    first = audit_log.checkpoint(signing_key)
    assert first.tree_size == 7
    fill(audit_log, 6)
    second = audit_log.checkpoint(signing_key)
    assert [cp.tree_size for cp in audit_log.checkpoints()] == [7, 13]
    assert audit_log.latest_checkpoint() == second
    for index in range(13):
        audit_log.inclusion_proof(index).verify(second.root_hash)
    for index in range(7):
        audit_log.inclusion_proof(index, 7).verify(first.root_hash)
    audit_log.consistency_proof(7, 13).verify(first.root_hash, second.root_hash)
    assert audit_log.root(7) == first.root_hash
    assert audit_log.verify().ok
    with pytest.raises(AuditError):
        audit_log.inclusion_proof(13)
    with pytest.raises(AuditError):
        audit_log.consistency_proof(14)
    with pytest.raises(AuditError):
        audit_log.entry(99)


def test_subject_and_log_keys(audit_log: AuditLog, store: sessionmaker[Session]) -> None:
    fill(audit_log, 6)
    with store() as session:
        keys = session.execute(select(AuditBodyKey)).scalars().all()
    assert sorted(str(k.scope) for k in keys) == ["log", "subject", "subject"]
    assert audit_log.entry(0).key_id != audit_log.entry(1).key_id
    assert audit_log.entry(0).key_id == audit_log.entry(3).key_id


def test_append_is_one_transaction(audit_log: AuditLog, store: sessionmaker[Session]) -> None:
    fill(audit_log, 2)
    with pytest.raises(RuntimeError, match="crash"), transaction(store) as session:
        audit_log.append(AuditEvent(EventType.REFUSAL, {"why": "budget"}, "p_new"), session=session)
        raise RuntimeError("crash after the append, before commit")
    assert audit_log.size() == 2
    with store() as session:
        assert session.get(AuditEntry, 2) is None
        assert (
            session.execute(select(AuditBodyKey).where(AuditBodyKey.subject_ref == "p_new")).first()
            is None
        )
    entry = audit_log.append(AuditEvent(EventType.REFUSAL, {"why": "budget"}))
    assert entry.index == 2


@pytest.mark.parametrize("column", ["ciphertext", "nonce", "subject_ref"])
def test_one_byte_edit_breaks_inclusion_proof(
    audit_log: AuditLog,
    store: sessionmaker[Session],
    signing_key: Ed25519PrivateKey,
    column: str,
) -> None:
    fill(audit_log, 9)
    signed = audit_log.checkpoint(signing_key)
    audit_log.inclusion_proof(5, signed.tree_size).verify(signed.root_hash)
    flip_byte(store, 5, column)
    with pytest.raises(ProofError, match="leaf 5"):
        audit_log.inclusion_proof(5, signed.tree_size).verify(signed.root_hash)
    audit_log.inclusion_proof(4, signed.tree_size).verify(signed.root_hash)  # others unaffected
    with pytest.raises(AuditIntegrityError, match="entry 5"):
        audit_log.checkpoint(signing_key)  # never signs over tampering
    report = audit_log.verify()
    assert not report.ok
    assert any(i.kind == IssueKind.ENTRY and i.entry_index == 5 for i in report.issues)
    assert any(i.kind == IssueKind.CHECKPOINT and i.checkpoint == 0 for i in report.issues)


def test_removed_entry_is_refused_before_signing(
    audit_log: AuditLog, store: sessionmaker[Session], signing_key: Ed25519PrivateKey
) -> None:
    fill(audit_log, 5)
    audit_log.checkpoint(signing_key)
    with transaction(store) as session:
        session.delete(session.get(AuditEntry, 4))
    with pytest.raises(AuditIntegrityError, match="5 entries but 4"):
        audit_log.checkpoint(signing_key)


def test_checkpoint_time_never_goes_back(
    audit_log: AuditLog, signing_key: Ed25519PrivateKey
) -> None:
    fill(audit_log, 1)
    first = audit_log.checkpoint(signing_key)
    with pytest.raises(AuditIntegrityError, match="back in time"):
        audit_log.checkpoint(signing_key, now=first.checkpoint.timestamp - timedelta(seconds=5))


def test_crypto_shredding_keeps_every_proof(
    audit_log: AuditLog, signing_key: Ed25519PrivateKey
) -> None:
    fill(audit_log, 9)  # ALICE: 0, 3, 6; BOB: 1, 4, 7; no subject: 2, 5, 8
    before = audit_log.checkpoint(signing_key)
    destruction = audit_log.shred_subject(ALICE, reason="erasure request 42")
    assert destruction.event_type == EventType.KEY_DESTRUCTION
    assert destruction.subject == ALICE
    assert audit_log.read_body(destruction.index)["reason"] == "erasure request 42"
    assert audit_log.is_shredded(ALICE)
    assert not audit_log.is_shredded(BOB)
    for index in (0, 3, 6):
        with pytest.raises(BodyUnavailable, match="crypto-shredded"):
            audit_log.read_body(index)
    for index in (1, 2, 4, 5, 7, 8):
        assert audit_log.read_body(index)["i"] == index
    after = audit_log.checkpoint(signing_key)
    for index in range(after.tree_size):
        audit_log.inclusion_proof(index).verify(after.root_hash)
    for index in range(before.tree_size):
        audit_log.inclusion_proof(index, before.tree_size).verify(before.root_hash)
    audit_log.consistency_proof(before.tree_size).verify(before.root_hash, after.root_hash)
    assert audit_log.verify(before).ok
    with pytest.raises(SubjectShredded):
        audit_log.append(AuditEvent(EventType.CONSENT_CHANGE, {"status": "given"}, ALICE))
    with pytest.raises(SubjectShredded):
        audit_log.shred_subject(ALICE, reason="again")
    assert audit_log.size() == 10


def test_shredding_a_subject_never_logged(audit_log: AuditLog) -> None:
    entry = audit_log.shred_subject("p_unknown", reason="erasure before any event")
    assert entry.index == 0
    assert audit_log.is_shredded("p_unknown")
    with pytest.raises(SubjectShredded):
        audit_log.append(AuditEvent(EventType.CONSENT_CHANGE, {}, "p_unknown"))
