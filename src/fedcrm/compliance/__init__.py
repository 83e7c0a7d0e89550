"""fedcrm.compliance: the evidence a compliance officer can check.

This package never imports torch, opacus, tenseal or any other part of fedcrm except
``fedcrm.exceptions``. It holds the compliance store (SQLAlchemy 2 with Alembic migrations;
SQLite by default, PostgreSQL by URL), the privacy ledger, the consent registry
(:class:`ConsentRegistry`), hashed API keys and, in :mod:`fedcrm.compliance.audit`, the
tamper-evident audit log. The FastAPI service is :mod:`fedcrm.compliance.api` and the
``fedcrm compliance`` commands are :mod:`fedcrm.compliance.cli` (both imported on demand).
Its layers and modules: see docs/compliance.md.

Example:
    >>> from fedcrm.compliance import PrivacyLedger, open_store, sqlite_url
    >>> factory = open_store(sqlite_url("compliance.db"))  # doctest: +SKIP
    >>> ledger = PrivacyLedger(factory)  # doctest: +SKIP
    >>> ledger.cumulative_epsilon("b1", "churn", "churn-model-training")  # doctest: +SKIP
    0.0
"""

from fedcrm.compliance.apikeys import ApiKeyInfo, ApiKeyStore, Principal
from fedcrm.compliance.consent import (
    ConsentRecordView,
    ConsentRegistry,
    ConsentSnapshot,
    CoverageCount,
    HistoryEntry,
    ImportSummary,
    Notice,
    PurposeStatus,
)
from fedcrm.compliance.customer_ledger import CustomerLedger, CustomerTotal, SpendCustomers
from fedcrm.compliance.db import (
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    make_session_factory,
    open_store,
    sqlite_url,
    transaction,
    upgrade,
)
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
from fedcrm.compliance.errors import (
    ApiKeyError,
    AuditError,
    AuditIntegrityError,
    AuditVerificationError,
    BodyUnavailable,
    ComplianceError,
    ConsentError,
    ConsentImportError,
    ConsentNotFound,
    ConsentStateError,
    ConsentValidationError,
    CumulativeEpsilonDecrease,
    DuplicateSpend,
    ExportFormatError,
    ImportRowError,
    KeyFileError,
    LedgerError,
    ManifestError,
    ProofError,
    SignatureError,
    StoreError,
    SubjectShredded,
)
from fedcrm.compliance.ledger import LedgerEntry, LedgerTotal, PrivacyLedger
from fedcrm.compliance.lineage import LineageStore, customer_lineage
from fedcrm.compliance.manifest import (
    ConsentRefusal,
    ManifestArchive,
    RefusalCode,
    RoundManifest,
)

__all__ = [
    "Accountant",
    "ApiKeyError",
    "ApiKeyInfo",
    "ApiKeyStore",
    "AuditError",
    "AuditIntegrityError",
    "AuditVerificationError",
    "BodyUnavailable",
    "Channel",
    "CollectionMethod",
    "ComplianceError",
    "ConsentError",
    "ConsentImportError",
    "ConsentNotFound",
    "ConsentRecordView",
    "ConsentRefusal",
    "ConsentRegistry",
    "ConsentSnapshot",
    "ConsentStateError",
    "ConsentStatus",
    "ConsentValidationError",
    "CoverageCount",
    "CumulativeEpsilonDecrease",
    "CustomerLedger",
    "CustomerTotal",
    "Decision",
    "DuplicateSpend",
    "EventType",
    "ExportFormatError",
    "HistoryEntry",
    "ImportRowError",
    "ImportSummary",
    "KeyFileError",
    "KeyScope",
    "LedgerEntry",
    "LedgerError",
    "LedgerTotal",
    "LegalBasis",
    "LineageStore",
    "ManifestArchive",
    "ManifestError",
    "Mechanism",
    "NeighbouringRelation",
    "Notice",
    "Principal",
    "PrivacyLedger",
    "PrivacyUnit",
    "ProofError",
    "Purpose",
    "PurposeStatus",
    "RefusalCode",
    "Role",
    "RoundManifest",
    "SamplingMethod",
    "SignatureError",
    "SpendCustomers",
    "StoreError",
    "SubjectShredded",
    "current_revision",
    "customer_lineage",
    "downgrade",
    "head_revision",
    "make_engine",
    "make_session_factory",
    "open_store",
    "sqlite_url",
    "transaction",
    "upgrade",
]
