"""The consent registry: per-customer, per-purpose consent with an append-only history.

A record per pseudonymous customer and branch, shaped after W3C DPV and ISO/IEC TS 27560; every
change appends a history row and a ``consent-change`` audit event in one transaction, under the
status rules of :mod:`fedcrm.compliance.consent._rules`. See docs/compliance.md (the record's
shape, what an erasure keeps, and the package's modules).
"""

from fedcrm.compliance.consent._checks import ACTOR_PATTERN, NAME_PATTERN
from fedcrm.compliance.consent._import import (
    CSV_IMPORTABLE_STATUSES,
    CSV_OPTIONAL_COLUMNS,
    CSV_REQUIRED_COLUMNS,
    MAX_IMPORT_ROWS,
)
from fedcrm.compliance.consent._records import (
    RECEIPT_VERSION,
    ConsentRecordView,
    ConsentSnapshot,
    CoverageCount,
    HistoryEntry,
    ImportSummary,
    Notice,
    PurposeStatus,
)
from fedcrm.compliance.consent._registry import ConsentRegistry
from fedcrm.compliance.consent._requests import PurposeSelection

__all__ = [
    "ACTOR_PATTERN",
    "CSV_IMPORTABLE_STATUSES",
    "CSV_OPTIONAL_COLUMNS",
    "CSV_REQUIRED_COLUMNS",
    "MAX_IMPORT_ROWS",
    "NAME_PATTERN",
    "RECEIPT_VERSION",
    "ConsentRecordView",
    "ConsentRegistry",
    "ConsentSnapshot",
    "CoverageCount",
    "HistoryEntry",
    "ImportSummary",
    "Notice",
    "PurposeSelection",
    "PurposeStatus",
]
