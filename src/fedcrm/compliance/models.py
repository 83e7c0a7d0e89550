"""SQLAlchemy 2 models of the compliance store.

The schema itself is owned by the Alembic migrations in ``fedcrm/compliance/migrations``; these
typed models mirror it for queries. A test checks that both agree.

Tables:
    ``audit_log_state``: one row with the current tree size, locked by every append.
    ``audit_entries``: the leaves of the audit log (RFC 9162 §2.1), bodies encrypted.
    ``audit_body_keys``: per-subject and log-level body keys; shredding clears the key.
    ``audit_checkpoints``: signed tree heads (tree size, root hash, timestamp, Ed25519).
    ``privacy_ledger``: one row per privacy-budget decision (issue 3, "The privacy ledger").
    ``privacy_ledger_totals``: the latest cumulative ε per (branch, model, purpose), locked by
    every ledger append so that no concurrent writer can lower it.
    ``consent_records``: one consent record per (branch, pseudonymous customer); never updated.
    ``consent_events``: the append-only consent history (database triggers refuse UPDATE and
    DELETE); the current status of a purpose is its latest event.
    ``api_keys``: API keys of the compliance service, stored as SHA-256 hashes only.
    ``round_manifests``, ``model_releases``: lineage of federated runs (append-only).
    ``customer_spends``, ``customer_privacy``: the per-customer ledger (which spends included
    each customer, and each customer's cumulative ε).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Double,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fedcrm.compliance._types import UTCDateTime, utcnow
from fedcrm.compliance.enums import (
    Accountant,
    Channel,
    CollectionMethod,
    ConsentStatus,
    Decision,
    EventType,
    KeyScope,
    LegalBasis,
    Mechanism,
    NeighbouringRelation,
    PrivacyUnit,
    Purpose,
    Role,
    SamplingMethod,
)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

_REF_LENGTH = 128


def _str_enum(enum_cls: type[StrEnum], name: str) -> Enum:
    """Return a non-native SQL enum storing the values of ``enum_cls`` (a ``StrEnum``)."""
    return Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        validate_strings=True,
        values_callable=lambda members: [member.value for member in members],
    )


class Base(DeclarativeBase):
    """Declarative base of every compliance table (shared naming convention)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


class AuditLogState(Base):
    """The audit log's head: a single row, locked while an entry is appended."""

    __tablename__ = "audit_log_state"
    __table_args__ = (
        CheckConstraint("id = 1", name="single_row"),
        CheckConstraint("tree_size >= 0", name="tree_size_non_negative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    tree_size: Mapped[int] = mapped_column(BigInteger)


class AuditBodyKey(Base):
    """A body-encryption key: one per pseudonymous subject, plus one for the log itself.

    Crypto-shredding sets ``key_material`` to NULL and records ``shredded_at``; the row stays
    as a tombstone so that the entries encrypted under it remain attributable.
    """

    __tablename__ = "audit_body_keys"
    __table_args__ = (
        CheckConstraint(
            "(scope = 'log' AND subject_ref IS NULL) OR "
            "(scope = 'subject' AND subject_ref IS NOT NULL)",
            name="scope_subject",
        ),
        CheckConstraint(
            "(shredded_at IS NULL AND key_material IS NOT NULL) OR "
            "(shredded_at IS NOT NULL AND key_material IS NULL)",
            name="shredded_has_no_key",
        ),
    )

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    scope: Mapped[KeyScope] = mapped_column(_str_enum(KeyScope, "key_scope"))
    subject_ref: Mapped[str | None] = mapped_column(String(_REF_LENGTH), unique=True)
    key_material: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    shredded_at: Mapped[datetime | None]


class AuditEntry(Base):
    """One leaf of the audit log; ``seq`` is its 0-based leaf index (RFC 9162 §2.1)."""

    __tablename__ = "audit_entries"
    __table_args__ = (CheckConstraint("seq >= 0", name="seq_non_negative"),)

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    event_type: Mapped[EventType] = mapped_column(_str_enum(EventType, "event_type"))
    subject_ref: Mapped[str | None] = mapped_column(String(_REF_LENGTH), index=True)
    time: Mapped[datetime]
    key_id: Mapped[str] = mapped_column(String(32), ForeignKey("audit_body_keys.key_id"))
    algorithm: Mapped[str] = mapped_column(String(32))
    nonce: Mapped[bytes] = mapped_column(LargeBinary)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    leaf_hash: Mapped[bytes] = mapped_column(LargeBinary)


class AuditCheckpoint(Base):
    """A signed tree head: tree size, root hash and time, signed with Ed25519."""

    __tablename__ = "audit_checkpoints"
    __table_args__ = (CheckConstraint("tree_size >= 0", name="tree_size_non_negative"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tree_size: Mapped[int] = mapped_column(BigInteger, index=True)
    root_hash: Mapped[bytes] = mapped_column(LargeBinary)
    timestamp_ms: Mapped[int] = mapped_column(BigInteger)
    key_id: Mapped[str] = mapped_column(String(64))
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    signature: Mapped[bytes] = mapped_column(LargeBinary)


class PrivacyLedgerEntry(Base):
    """One privacy-budget decision for a (run, round, branch, model, purpose).

    Columns follow issue 3 ("The privacy ledger"). ``epsilon`` is the ε of this event alone;
    ``cumulative_epsilon`` the branch's total for (branch, model, purpose) after it (unchanged
    by a refusal).
    """

    __tablename__ = "privacy_ledger"
    __table_args__ = (
        CheckConstraint("round >= 0", name="round_non_negative"),
        CheckConstraint("noise_multiplier >= 0", name="noise_multiplier_non_negative"),
        CheckConstraint("clipping_norm > 0", name="clipping_norm_positive"),
        CheckConstraint("sampling_rate > 0 AND sampling_rate <= 1", name="sampling_rate_range"),
        CheckConstraint("steps >= 0", name="steps_non_negative"),
        CheckConstraint("delta > 0 AND delta < 1", name="delta_range"),
        CheckConstraint("epsilon >= 0", name="epsilon_non_negative"),
        CheckConstraint("cumulative_epsilon >= 0", name="cumulative_epsilon_non_negative"),
        CheckConstraint(
            "epsilon_budget IS NULL OR epsilon_budget > 0", name="epsilon_budget_positive"
        ),
        CheckConstraint(
            "decision = 'admitted' OR (reason IS NOT NULL AND reason <> '')",
            name="refusal_has_reason",
        ),
        Index("ix_privacy_ledger_scope", "branch", "model", "purpose"),
        Index("uq_privacy_ledger_spend", "branch", "model", "purpose", "spend_id", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(_REF_LENGTH), index=True)
    round: Mapped[int] = mapped_column(Integer)
    branch: Mapped[str] = mapped_column(String(_REF_LENGTH))
    model: Mapped[str] = mapped_column(String(_REF_LENGTH))
    purpose: Mapped[str] = mapped_column(String(64))
    privacy_unit: Mapped[PrivacyUnit] = mapped_column(_str_enum(PrivacyUnit, "privacy_unit"))
    neighbouring_relation: Mapped[NeighbouringRelation] = mapped_column(
        _str_enum(NeighbouringRelation, "neighbouring_relation")
    )
    mechanism: Mapped[Mechanism] = mapped_column(_str_enum(Mechanism, "mechanism"))
    noise_multiplier: Mapped[float] = mapped_column(Double)
    clipping_norm: Mapped[float] = mapped_column(Double)
    sampling_rate: Mapped[float] = mapped_column(Double)
    sampling_method: Mapped[SamplingMethod] = mapped_column(
        _str_enum(SamplingMethod, "sampling_method")
    )
    steps: Mapped[int] = mapped_column(Integer)
    delta: Mapped[float] = mapped_column(Double)
    accountant: Mapped[Accountant] = mapped_column(_str_enum(Accountant, "accountant"))
    library_version: Mapped[str] = mapped_column(String(_REF_LENGTH))
    epsilon: Mapped[float] = mapped_column(Double)
    cumulative_epsilon: Mapped[float] = mapped_column(Double)
    epsilon_budget: Mapped[float | None] = mapped_column(Double)
    decision: Mapped[Decision] = mapped_column(_str_enum(Decision, "decision"))
    reason: Mapped[str | None] = mapped_column(Text)
    spend_id: Mapped[str | None] = mapped_column(String(64))
    dp_event: Mapped[str | None] = mapped_column(Text)
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class PrivacyLedgerTotal(Base):
    """The cumulative ε of one (branch, model, purpose), the row every ledger append locks."""

    __tablename__ = "privacy_ledger_totals"
    __table_args__ = (
        CheckConstraint("cumulative_epsilon >= 0", name="cumulative_epsilon_non_negative"),
    )

    branch: Mapped[str] = mapped_column(String(_REF_LENGTH), primary_key=True)
    model: Mapped[str] = mapped_column(String(_REF_LENGTH), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(64), primary_key=True)
    cumulative_epsilon: Mapped[float] = mapped_column(Double)
    last_entry_id: Mapped[int] = mapped_column(Integer, ForeignKey("privacy_ledger.id"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class CustomerSpend(Base):
    """One customer's rows were in one DP-SGD spend of their branch (append-only)."""

    __tablename__ = "customer_spends"
    __table_args__ = (
        UniqueConstraint(
            "branch", "customer", "model", "purpose", "spend_id", name="uq_customer_spends"
        ),
        Index("ix_customer_spends_scope", "branch", "model", "purpose"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    branch: Mapped[str] = mapped_column(String(_REF_LENGTH))
    customer: Mapped[str] = mapped_column(String(_REF_LENGTH), index=True)
    model: Mapped[str] = mapped_column(String(_REF_LENGTH))
    purpose: Mapped[str] = mapped_column(String(64))
    spend_id: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[str] = mapped_column(String(_REF_LENGTH))
    round: Mapped[int] = mapped_column(Integer)
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class CustomerPrivacy(Base):
    """A customer's cumulative ε for (branch, model, purpose): never lowered."""

    __tablename__ = "customer_privacy"
    __table_args__ = (
        CheckConstraint("cumulative_epsilon >= 0", name="customer_epsilon_non_negative"),
        CheckConstraint("delta > 0 AND delta < 1", name="customer_delta_range"),
    )

    branch: Mapped[str] = mapped_column(String(_REF_LENGTH), primary_key=True)
    customer: Mapped[str] = mapped_column(String(_REF_LENGTH), primary_key=True)
    model: Mapped[str] = mapped_column(String(_REF_LENGTH), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(64), primary_key=True)
    cumulative_epsilon: Mapped[float] = mapped_column(Double)
    delta: Mapped[float] = mapped_column(Double)
    privacy_unit: Mapped[PrivacyUnit] = mapped_column(_str_enum(PrivacyUnit, "privacy_unit"))
    accountant: Mapped[Accountant] = mapped_column(_str_enum(Accountant, "accountant"))
    spends: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ConsentRecord(Base):
    """The consent record of one pseudonymous customer at one branch (ISO/IEC TS 27560).

    The row is written once and never updated; everything that changes is a
    :class:`ConsentEvent`.
    """

    __tablename__ = "consent_records"
    __table_args__ = (
        UniqueConstraint("branch", "subject_ref", name="uq_consent_records_branch_subject"),
    )

    record_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    branch: Mapped[str] = mapped_column(String(_REF_LENGTH), index=True)
    subject_ref: Mapped[str] = mapped_column(String(_REF_LENGTH), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ConsentEvent(Base):
    """One entry of a record's append-only consent history, for one purpose.

    ``audit_index`` is the leaf index of the ``consent-change`` audit event written in the same
    transaction.
    """

    __tablename__ = "consent_events"
    __table_args__ = (
        CheckConstraint(
            "expires_at IS NULL OR expires_at > occurred_at", name="expiry_after_event"
        ),
        Index("ix_consent_events_record_purpose", "record_id", "purpose", "occurred_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    record_id: Mapped[str] = mapped_column(String(32), ForeignKey("consent_records.record_id"))
    purpose: Mapped[Purpose] = mapped_column(_str_enum(Purpose, "consent_purpose"))
    event: Mapped[ConsentStatus] = mapped_column(_str_enum(ConsentStatus, "consent_event"))
    legal_basis: Mapped[LegalBasis] = mapped_column(_str_enum(LegalBasis, "legal_basis"))
    occurred_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    actor: Mapped[str] = mapped_column(String(_REF_LENGTH))
    channel: Mapped[Channel] = mapped_column(_str_enum(Channel, "consent_channel"))
    collection_method: Mapped[CollectionMethod] = mapped_column(
        _str_enum(CollectionMethod, "collection_method")
    )
    notice_id: Mapped[str] = mapped_column(String(_REF_LENGTH))
    notice_version: Mapped[str] = mapped_column(String(64))
    notice_hash: Mapped[str] = mapped_column(String(64))
    audit_index: Mapped[int] = mapped_column(BigInteger, ForeignKey("audit_entries.seq"))
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """An API key of the compliance service: only the SHA-256 of the secret token is stored."""

    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint(
            "(role = 'branch' AND branch IS NOT NULL) OR (role <> 'branch' AND branch IS NULL)",
            name="branch_role_has_branch",
        ),
    )

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[bytes] = mapped_column(LargeBinary)
    role: Mapped[Role] = mapped_column(_str_enum(Role, "api_role"))
    branch: Mapped[str | None] = mapped_column(String(_REF_LENGTH))
    label: Mapped[str] = mapped_column(String(_REF_LENGTH))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class RoundManifestRow(Base):
    """The public part of one branch's round manifest (lineage; never a customer id).

    ``root`` is the Merkle root over the salted commitments of the customers the branch used;
    ``audit_index`` the leaf of its ``round-manifest`` audit event (same transaction).
    """

    __tablename__ = "round_manifests"
    __table_args__ = (
        CheckConstraint("round >= 0", name="round_non_negative"),
        CheckConstraint(
            "rows_after >= 0 AND rows_after <= rows_before AND leaves = rows_after",
            name="counts",
        ),
        UniqueConstraint("run_id", "round", "branch", name="uq_round_manifests_run_round"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(_REF_LENGTH), index=True)
    round: Mapped[int] = mapped_column(Integer)
    branch: Mapped[str] = mapped_column(String(_REF_LENGTH), index=True)
    purpose: Mapped[Purpose] = mapped_column(_str_enum(Purpose, "purpose"))
    root: Mapped[str] = mapped_column(String(64))
    leaves: Mapped[int] = mapped_column(Integer)
    snapshot_version: Mapped[int] = mapped_column(BigInteger)
    rows_before: Mapped[int] = mapped_column(Integer)
    rows_after: Mapped[int] = mapped_column(Integer)
    excluded: Mapped[str] = mapped_column(Text)
    """JSON object: rows left out by the consent gate, by reason."""
    audit_index: Mapped[int] = mapped_column(BigInteger, ForeignKey("audit_entries.seq"))
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelRelease(Base):
    """A released model file: its SHA-256 and the last round whose updates it includes."""

    __tablename__ = "model_releases"
    __table_args__ = (CheckConstraint("last_round >= 0", name="last_round_non_negative"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(_REF_LENGTH), index=True)
    model: Mapped[str] = mapped_column(String(_REF_LENGTH))
    sha256: Mapped[str] = mapped_column(String(64))
    last_round: Mapped[int] = mapped_column(Integer)
    file_name: Mapped[str] = mapped_column(String(255))
    audit_index: Mapped[int] = mapped_column(BigInteger, ForeignKey("audit_entries.seq"))
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)
