"""Tamper-evident audit log: RFC 9162 Merkle tree, signed checkpoints, crypto-shredding.

Public API:
    * :class:`AuditLog` over the compliance store: ``append``, ``append_many`` (bulk, one pass),
      ``shred_subject``, ``inclusion_proof``, ``consistency_proof``, ``checkpoint``, ``export``,
      ``verify``.
    * :func:`verify_export`: the offline verifier of an exported log.
    * The RFC 9162 §2.1 primitives (:func:`leaf_hash`, :func:`node_hash`, :class:`MerkleTree`,
      :func:`verify_inclusion`, :func:`verify_consistency`), reusable e.g. for round manifests.
    * Ed25519 keys and :class:`SignedCheckpoint`.

The command-line sub-app is :data:`fedcrm.compliance.audit.cli.app` (imported on demand, so
importing this package does not import typer).
"""

from fedcrm.compliance.audit._events import AuditEvent, LogEntry, canonical_json
from fedcrm.compliance.audit._log import AuditLog, ConsistencyProof, InclusionProof
from fedcrm.compliance.audit._merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    MerkleTree,
    leaf_hash,
    merkle_tree_hash,
    node_hash,
    root_from_inclusion_proof,
    verify_consistency,
    verify_inclusion,
)
from fedcrm.compliance.audit._signing import (
    Checkpoint,
    SignedCheckpoint,
    generate_signing_key,
    key_id,
    load_public_key,
    load_signing_key,
    raw_public_key,
    sign_checkpoint,
)
from fedcrm.compliance.audit._verify import (
    IssueKind,
    VerificationIssue,
    VerificationReport,
    verify_export,
)
from fedcrm.compliance.enums import EventType

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "AuditEvent",
    "AuditLog",
    "Checkpoint",
    "ConsistencyProof",
    "EventType",
    "InclusionProof",
    "IssueKind",
    "LogEntry",
    "MerkleTree",
    "SignedCheckpoint",
    "VerificationIssue",
    "VerificationReport",
    "canonical_json",
    "generate_signing_key",
    "key_id",
    "leaf_hash",
    "load_public_key",
    "load_signing_key",
    "merkle_tree_hash",
    "node_hash",
    "raw_public_key",
    "root_from_inclusion_proof",
    "sign_checkpoint",
    "verify_consistency",
    "verify_export",
    "verify_inclusion",
]
