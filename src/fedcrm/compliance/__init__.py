"""fedcrm.compliance: the evidence a compliance officer can check.

This package never imports torch, opacus, tenseal or any other part of fedcrm except
``fedcrm.exceptions``. It holds the compliance store (SQLAlchemy 2 with Alembic migrations;
SQLite by default, PostgreSQL by URL), the privacy ledger and, in
:mod:`fedcrm.compliance.audit`, the tamper-evident audit log.

Example:
    >>> from fedcrm.compliance import PrivacyLedger, open_store, sqlite_url
    >>> factory = open_store(sqlite_url("compliance.db"))  # doctest: +SKIP
    >>> ledger = PrivacyLedger(factory)  # doctest: +SKIP
    >>> ledger.cumulative_epsilon("b1", "churn", "churn-model-training")  # doctest: +SKIP
    0.0
"""

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
    Decision,
    EventType,
    KeyScope,
    Mechanism,
    NeighbouringRelation,
    PrivacyUnit,
    SamplingMethod,
)
from fedcrm.compliance.errors import (
    AuditError,
    AuditIntegrityError,
    AuditVerificationError,
    BodyUnavailable,
    ComplianceError,
    CumulativeEpsilonDecrease,
    ExportFormatError,
    KeyFileError,
    LedgerError,
    ProofError,
    SignatureError,
    StoreError,
    SubjectShredded,
)
from fedcrm.compliance.ledger import LedgerEntry, LedgerTotal, PrivacyLedger

__all__ = [
    "Accountant",
    "AuditError",
    "AuditIntegrityError",
    "AuditVerificationError",
    "BodyUnavailable",
    "ComplianceError",
    "CumulativeEpsilonDecrease",
    "Decision",
    "EventType",
    "ExportFormatError",
    "KeyFileError",
    "KeyScope",
    "LedgerEntry",
    "LedgerError",
    "LedgerTotal",
    "Mechanism",
    "NeighbouringRelation",
    "PrivacyLedger",
    "PrivacyUnit",
    "ProofError",
    "SamplingMethod",
    "SignatureError",
    "StoreError",
    "SubjectShredded",
    "current_revision",
    "downgrade",
    "head_revision",
    "make_engine",
    "make_session_factory",
    "open_store",
    "sqlite_url",
    "transaction",
    "upgrade",
]
