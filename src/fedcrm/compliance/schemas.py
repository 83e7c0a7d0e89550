"""Request and response bodies of the compliance service, split by direction.

``XCreate`` models are what a client may send; ``XPublic`` models are all a response may carry.
Response models read the domain objects' attributes (``XPublic.model_validate(obj)``, pydantic's
``from_attributes``) but declare every field they carry, so an internal field (a token hash, a
key, a stored row id) can only reach a response by being added here on purpose. Researchers'
responses (:class:`CoveragePublic`, :class:`LedgerTotalPublic`, :class:`BurnDownPublic`) carry
no per-customer field at all.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Self

from pydantic import AliasPath, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from fedcrm.compliance.audit._log import ConsistencyProof, InclusionProof
from fedcrm.compliance.audit._signing import SignedCheckpoint
from fedcrm.compliance.consent import ACTOR_PATTERN, NAME_PATTERN, ConsentRecordView, Notice
from fedcrm.compliance.core.config import (
    Controller,
    ProcessingActivity,
    RopaConfig,
    RopaSource,
    SecurityMeasures,
)
from fedcrm.compliance.enums import (
    Accountant,
    Channel,
    CollectionMethod,
    ConsentStatus,
    Decision,
    LegalBasis,
    PrivacyUnit,
    Purpose,
    Role,
)

HEX_HASH_PATTERN = r"^[0-9a-f]{64}$"
"""A lower-case hex SHA-256 (notice texts, manifest roots, model hashes, proof nodes)."""

_Name = Field(pattern=NAME_PATTERN)
_Actor = Field(pattern=ACTOR_PATTERN, examples=["customer"])


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, from_attributes=True)


# -- consent: requests --------------------------------------------------------------------


class NoticeBase(_In):
    """The privacy notice shown: its id, version and the SHA-256 of its exact text."""

    notice_id: str = _Name
    version: str = Field(min_length=1, max_length=64)
    sha256: str = Field(pattern=HEX_HASH_PATTERN)

    def to_domain(self) -> Notice:
        """Return the domain notice."""
        return Notice(self.notice_id, self.version, self.sha256)


class PurposeGrant(_In):
    """A purpose and the legal basis it is processed under."""

    purpose: Purpose
    legal_basis: LegalBasis = LegalBasis.CONSENT


class ConsentDecisionBase(_In):
    """What giving and refusing both carry: the purposes asked about, the notice, where, who."""

    purposes: list[PurposeGrant] = Field(min_length=1, max_length=len(Purpose))
    notice: NoticeBase
    channel: Channel
    actor: str = _Actor
    collection_method: CollectionMethod = CollectionMethod.ONLINE_FORM

    def legal_bases(self) -> dict[Purpose, LegalBasis]:
        """Return each purpose with the legal basis it is asked under."""
        return {grant.purpose: grant.legal_basis for grant in self.purposes}


class ConsentGiveCreate(ConsentDecisionBase):
    """Give consent for one or more purposes."""

    expires_at: AwareDatetime | None = None
    at: AwareDatetime | None = Field(default=None, description="When (default: now).")


class ConsentRefuseCreate(ConsentDecisionBase):
    """Record a refusal for one or more purposes."""

    at: AwareDatetime | None = None


class ConsentWithdrawCreate(_In):
    """Withdraw consent: only where and who; every given purpose unless ``purposes`` is set."""

    channel: Channel
    actor: str = _Actor
    purposes: list[Purpose] | None = Field(default=None, min_length=1, max_length=len(Purpose))
    at: AwareDatetime | None = None


class ConsentRenewCreate(_In):
    """Renew given (possibly expired) consent with a new expiry, optionally a new notice."""

    channel: Channel
    actor: str = _Actor
    expires_at: AwareDatetime | None
    purposes: list[Purpose] | None = Field(default=None, min_length=1, max_length=len(Purpose))
    notice: NoticeBase | None = None
    at: AwareDatetime | None = None


class ConsentEraseCreate(_In):
    """Erase a customer (Art. 17): their audit key is destroyed; consent is void from now on."""

    reason: str = Field(
        min_length=1, max_length=500, description="e.g. the erasure request's reference"
    )


# -- consent: responses -------------------------------------------------------------------


class NoticePublic(_Out):
    """A notice reference."""

    notice_id: str
    version: str
    sha256: str


class HistoryEntryPublic(_Out):
    """One event of the append-only consent history."""

    purpose: Purpose
    event: ConsentStatus
    legal_basis: LegalBasis
    occurred_at: datetime
    expires_at: datetime | None
    actor: str
    channel: Channel
    collection_method: CollectionMethod
    notice: NoticePublic
    audit_index: int


class PurposeStatusPublic(_Out):
    """The status of one purpose at the time asked."""

    purpose: Purpose
    status: ConsentStatus
    valid: bool
    legal_basis: LegalBasis
    since: datetime
    expires_at: datetime | None
    notice: NoticePublic

    @classmethod
    def of_record(cls, view: ConsentRecordView, at: datetime | None = None) -> list[Self]:
        """Return the status of each purpose of a record at ``at`` (default now), by purpose.

        The domain reports an erased customer's consents as recorded; a response never calls
        any of them valid.
        """
        statuses = [cls.model_validate(status) for _, status in sorted(view.status_at(at).items())]
        if view.erased:
            return [status.model_copy(update={"valid": False}) for status in statuses]
        return statuses


class ConsentRecordPublic(_Out):
    """A consent record: current status per purpose and the whole history."""

    record_id: str
    branch: str
    customer_id: str
    created_at: datetime
    erased: bool
    purposes: list[PurposeStatusPublic]
    history: list[HistoryEntryPublic]

    @classmethod
    def from_domain(cls, view: ConsentRecordView) -> Self:
        """Build from the domain object, with every purpose's status now."""
        return cls(
            record_id=view.record_id,
            branch=view.branch,
            customer_id=view.subject,
            created_at=view.created_at,
            erased=view.erased,
            purposes=PurposeStatusPublic.of_record(view),
            history=[HistoryEntryPublic.model_validate(entry) for entry in view.history],
        )


class ConsentStatusPublic(_Out):
    """A customer's status per purpose at a time."""

    branch: str
    customer_id: str
    at: datetime
    erased: bool
    purposes: list[PurposeStatusPublic]


class ValidIdsPublic(_Out):
    """The pseudonymous ids whose consent for a purpose is valid at a time."""

    branch: str
    purpose: Purpose
    at: datetime
    count: int
    customer_ids: list[str]


class CoveragePublic(_Out):
    """Consent counts of one branch and purpose (aggregates only)."""

    branch: str
    purpose: Purpose
    customers: int
    valid: int
    expired: int
    refused: int
    withdrawn: int
    erased: int
    coverage: float


class ImportSummaryPublic(_Out):
    """What a bulk consent import wrote."""

    branch: str
    rows: int
    records_created: int
    events: int
    customers: int


class ReceiptCheckpointPublic(_Out):
    """The latest signed checkpoint, as shown on a receipt and by the audit routes."""

    tree_size: int
    root_hash: str
    timestamp_ms: int
    signature_algorithm: str
    key_id: str
    public_key: str
    signature: str

    @classmethod
    def from_domain(cls, checkpoint: SignedCheckpoint) -> Self:
        """Build from the domain object."""
        return cls.model_validate(checkpoint.to_json())


class ReceiptAuditPublic(_Out):
    """Where the receipt's events are in the audit log."""

    entries: list[int]
    latest_checkpoint: ReceiptCheckpointPublic | None


class ReceiptPurposePublic(_Out):
    """One purpose on a receipt."""

    purpose: Purpose
    status: ConsentStatus
    valid: bool
    legal_basis: LegalBasis
    since: str
    expires_at: str | None
    notice: NoticePublic


class ReceiptHistoryPublic(_Out):
    """One history event on a receipt."""

    purpose: Purpose
    event: ConsentStatus
    legal_basis: LegalBasis
    occurred_at: str
    expires_at: str | None
    actor: str
    channel: Channel
    collection_method: CollectionMethod
    notice: NoticePublic
    audit_index: int
    recorded_at: str


class ReceiptPublic(_Out):
    """The JSON consent receipt handed to the customer."""

    receipt_version: int
    issued_at: str
    record_id: str
    branch: str
    customer_id: str
    erased: bool
    purposes: list[ReceiptPurposePublic]
    history: list[ReceiptHistoryPublic]
    audit: ReceiptAuditPublic
    withdrawal: str


# -- ledger -------------------------------------------------------------------------------


class LedgerEntryPublic(_Out):
    """One privacy-ledger decision (issue 3 columns)."""

    id: int
    run_id: str
    round: int
    branch: str
    model: str
    purpose: str
    privacy_unit: str
    neighbouring_relation: str
    mechanism: str
    noise_multiplier: float
    clipping_norm: float
    sampling_rate: float
    sampling_method: str
    steps: int
    delta: float
    accountant: str
    library_version: str
    epsilon: float
    cumulative_epsilon: float
    epsilon_budget: float | None
    decision: Decision
    reason: str | None
    recorded_at: datetime


class LedgerTotalPublic(_Out):
    """The cumulative ε of one (branch, model, purpose)."""

    branch: str
    model: str
    purpose: str
    cumulative_epsilon: float
    updated_at: datetime


class CustomerPrivacyPublic(_Out):
    """A customer's cumulative ε for one (branch, model, purpose): individual accounting."""

    branch: str
    customer: str
    model: str
    purpose: str
    cumulative_epsilon: float
    delta: float
    privacy_unit: PrivacyUnit
    accountant: Accountant
    spends: int
    updated_at: datetime


class BurnDownPointPublic(_Out):
    """The cumulative ε after one admitted round."""

    run_id: str
    round: int
    cumulative_epsilon: float
    recorded_at: datetime


class BurnDownPublic(_Out):
    """ε burn-down of one (branch, model, purpose) against its budget."""

    branch: str
    model: str
    purpose: str
    budget: float | None
    spent: float
    remaining: float | None
    refusals: int
    points: list[BurnDownPointPublic]


# -- audit --------------------------------------------------------------------------------


class CheckpointPublic(ReceiptCheckpointPublic):
    """A signed checkpoint (RFC 9162 §4.10 tree head with an Ed25519 signature)."""


class AuditStatusPublic(_Out):
    """The audit log's state and the result of verifying it now."""

    tree_size: int
    root_hash: str
    latest_checkpoint: CheckpointPublic | None
    entries_since_checkpoint: int
    verified: bool
    verified_at: datetime
    issues: list[str]
    warnings: list[str]


class InclusionProofPublic(_Out):
    """Inclusion proof of one entry (RFC 9162 §2.1.3)."""

    leaf_index: int
    tree_size: int
    leaf_hash: str
    inclusion_path: list[str]
    root_hash: str

    @classmethod
    def from_domain(cls, proof: InclusionProof, root: bytes) -> InclusionProofPublic:
        """Build from the domain object and the root it verifies against."""
        return cls.model_validate({**proof.to_json(), "root_hash": root.hex()})


class ConsistencyProofPublic(_Out):
    """Consistency proof between two tree sizes (RFC 9162 §2.1.4)."""

    first: int
    second: int
    consistency_path: list[str]
    first_root_hash: str
    second_root_hash: str

    @classmethod
    def from_domain(
        cls, proof: ConsistencyProof, first_root: bytes, second_root: bytes
    ) -> ConsistencyProofPublic:
        """Build from the domain object and both roots."""
        return cls.model_validate(
            {
                **proof.to_json(),
                "first_root_hash": first_root.hex(),
                "second_root_hash": second_root.hex(),
            }
        )


# -- records of processing (Art. 30) ------------------------------------------------------


class RopaRecordPublic(_Out):
    """One record of processing (Art. 30(1)(b)-(g)) for one purpose."""

    purpose: Purpose
    description: str
    legal_basis: LegalBasis | None = Field(
        description="None where the configuration establishes no legal basis (see notes)."
    )
    data_subjects: list[str]
    data_categories: list[str]
    recipients: list[str]
    third_country_transfers: str
    retention: str
    notes: list[str]
    branches: list[str]
    dp_targets: list[dict[str, Any]]

    @classmethod
    def from_config(
        cls, activity: ProcessingActivity, branches: list[str], security: SecurityMeasures
    ) -> Self:
        """Build from the configured activity, the known branches and the security measures."""
        targets = [
            target.model_dump(mode="json")
            for target in security.dp_targets
            if target.purpose == activity.purpose
        ]
        return cls.model_validate(
            {**activity.model_dump(), "branches": branches, "dp_targets": targets}
        )


class RopaPublic(_Out):
    """Records of processing activities (GDPR Art. 30(1)), generated from the configuration.

    ``source`` says what they were generated from: a run's configuration, a given one, or none
    (then no security measure is recorded as in force).
    """

    generated_at: datetime
    source: RopaSource
    controller: Controller
    branches: list[str]
    records: list[RopaRecordPublic]
    security: SecurityMeasures

    @classmethod
    def from_config(cls, config: RopaConfig, branches: list[str], generated_at: datetime) -> Self:
        """Build from the records' configuration and the branches to list."""
        return cls(
            generated_at=generated_at,
            source=config.source,
            controller=config.controller,
            branches=branches,
            records=[
                RopaRecordPublic.from_config(activity, branches, config.security)
                for activity in config.activities
            ],
            security=config.security,
        )


# -- auth and errors ----------------------------------------------------------------------


class PrincipalPublic(_Out):
    """Who the API key belongs to."""

    key_id: str
    role: Role
    branch: str | None


class ImportRowErrorPublic(_Out):
    """One rejected CSV row."""

    line: int
    reason: str


class ErrorPublic(_Out):
    """An error: a message, and every problem found where there are several."""

    detail: str
    problems: list[str] = []
    errors: list[ImportRowErrorPublic] = []


# -- lineage -------------------------------------------------------------------------------


def _in_manifest(name: str) -> Any:
    """A field read from the record's :class:`~fedcrm.compliance.manifest.RoundManifest`."""
    return Field(validation_alias=AliasPath("manifest", name))


class ManifestPublic(_Out):
    """A branch's round manifest as the coordinator recorded it (a root and counts, no ids)."""

    run_id: str
    round: int
    branch: str = _in_manifest("branch")
    purpose: Purpose = _in_manifest("purpose")
    root: str = _in_manifest("root")
    leaves: int = _in_manifest("leaves")
    consent_snapshot_version: int = _in_manifest("snapshot_version")
    rows_before: int = _in_manifest("rows_before")
    rows_after: int = _in_manifest("rows_after")
    excluded: dict[str, int] = _in_manifest("excluded")
    audit_index: int
    recorded_at: datetime


class ModelReleasePublic(_Out):
    """A released model: the SHA-256 of its file and the last round it includes."""

    run_id: str
    model: str
    sha256: str
    last_round: int
    file_name: str
    audit_index: int
    recorded_at: datetime


class RoundUsePublic(_Out):
    """One round that used a branch's data, and the released models that include it."""

    manifest: ManifestPublic = Field(validation_alias="record")
    models: list[ModelReleasePublic]


class LineageRunPublic(_Out):
    """Aggregates of one run's lineage (researchers see these only)."""

    run_id: str
    rounds: int
    branches: int
    manifests: int
    rows_used: int
    rows_excluded: int
    models: int


class MembershipCheckCreate(_In):
    """A branch's claim that a customer was in a round, to check against the recorded root.

    The branch discloses the customer's salt for this check only; the service recomputes the
    commitment and verifies the RFC 9162 inclusion proof against the root it recorded.
    """

    run_id: str = _Name
    round: int = Field(ge=0, le=1_000_000)
    branch: str = _Name
    customer_id: str = _Name
    salt: str = Field(pattern=r"^[0-9a-f]{32}$", description="The customer's 16-byte salt, hex.")
    leaf_index: int = Field(ge=0, le=1 << 40)
    tree_size: int = Field(ge=1, le=1 << 40)
    proof: list[Annotated[str, StringConstraints(pattern=HEX_HASH_PATTERN)]] = Field(
        default_factory=list, max_length=64
    )


class MembershipCheckPublic(_Out):
    """Whether the claim verified against the recorded root."""

    verified: bool
    root: str
    audit_index: int
    detail: str
