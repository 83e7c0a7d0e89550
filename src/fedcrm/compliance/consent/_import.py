"""Reading a branch's consent CSV into changes, every bad row reported with its line."""

from __future__ import annotations

import csv
import io

from fedcrm.compliance.consent._checks import check_subject, parse_time
from fedcrm.compliance.consent._records import Notice
from fedcrm.compliance.consent._rules import Change
from fedcrm.compliance.enums import (
    Channel,
    CollectionMethod,
    ConsentStatus,
    LegalBasis,
    Purpose,
    coerce_member,
)
from fedcrm.compliance.errors import ConsentValidationError, ImportRowError

CSV_REQUIRED_COLUMNS = (
    "customer_id",
    "purpose",
    "status",
    "legal_basis",
    "occurred_at",
    "notice_id",
    "notice_version",
    "notice_hash",
    "channel",
)
"""Columns every consent CSV must have (``customer_id`` is the pseudonymous id)."""

CSV_OPTIONAL_COLUMNS = ("expires_at", "collection_method")
"""Columns a consent CSV may have; ``collection_method`` defaults to ``branch-import``."""

CSV_IMPORTABLE_STATUSES = frozenset(
    {ConsentStatus.GIVEN, ConsentStatus.REFUSED, ConsentStatus.WITHDRAWN, ConsentStatus.RENEWED}
)
"""Statuses a CSV row may carry (``expired`` is derived from ``expires_at``)."""

MAX_IMPORT_ROWS = 200_000
"""Largest consent CSV accepted in one import (one transaction)."""


def parse_csv(
    source: io.TextIOBase, actor: str
) -> tuple[dict[str, list[Change]], list[ImportRowError], int]:
    """Read a consent CSV: its changes by customer (file order), its bad rows, its row count."""
    reader = csv.reader(source)
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        return {}, [ImportRowError(1, "the file is empty (no header row)")], 0
    except csv.Error as exc:
        return {}, [ImportRowError(1, f"unreadable CSV: {exc}")], 0
    errors = _header_problems(header)
    if errors:
        return {}, errors, 0
    by_subject: dict[str, list[Change]] = {}
    rows = 0
    line = reader.line_num
    try:
        for values in reader:
            line = reader.line_num
            if not any(value.strip() for value in values):
                continue
            rows += 1
            if rows > MAX_IMPORT_ROWS:
                errors.append(
                    ImportRowError(line, f"more than {MAX_IMPORT_ROWS} rows; split the file")
                )
                break
            if len(values) != len(header):
                errors.append(
                    ImportRowError(line, f"expected {len(header)} fields, found {len(values)}")
                )
                continue
            row = dict(zip(header, (value.strip() for value in values), strict=True))
            parsed = _parse_row(row, line, actor)
            if isinstance(parsed, ImportRowError):
                errors.append(parsed)
            else:
                by_subject.setdefault(row["customer_id"], []).append(parsed)
    except csv.Error as exc:
        errors.append(ImportRowError(line + 1, f"unreadable CSV: {exc}"))
    if rows == 0 and not errors:
        errors.append(ImportRowError(1, "the file has a header but no rows"))
    return by_subject, errors, rows


def _header_problems(header: list[str]) -> list[ImportRowError]:
    errors: list[ImportRowError] = []
    missing = [name for name in CSV_REQUIRED_COLUMNS if name not in header]
    allowed = set(CSV_REQUIRED_COLUMNS) | set(CSV_OPTIONAL_COLUMNS)
    unexpected = [name for name in header if name not in allowed]
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if missing:
        errors.append(ImportRowError(1, f"missing column(s): {', '.join(missing)}"))
    if unexpected:
        errors.append(
            ImportRowError(
                1,
                f"unexpected column(s): {', '.join(unexpected)} (a consent file carries "
                "pseudonymous ids only; allowed: " + ", ".join(sorted(allowed)) + ")",
            )
        )
    if duplicated:
        errors.append(ImportRowError(1, f"duplicated column(s): {', '.join(duplicated)}"))
    return errors


def _parse_row(row: dict[str, str], line: int, actor: str) -> Change | ImportRowError:
    problems: list[str] = []
    check_subject(row["customer_id"], problems)
    purpose = coerce_member(Purpose, row["purpose"], "purpose", problems)
    status = coerce_member(ConsentStatus, row["status"], "status", problems)
    if status is not None and status not in CSV_IMPORTABLE_STATUSES:
        allowed = ", ".join(sorted(s.value for s in CSV_IMPORTABLE_STATUSES))
        problems.append(f"status must be one of {allowed}; got {row['status']!r}")
    basis = coerce_member(LegalBasis, row["legal_basis"], "legal_basis", problems)
    channel = coerce_member(Channel, row["channel"], "channel", problems)
    method = coerce_member(
        CollectionMethod,
        row.get("collection_method") or CollectionMethod.BRANCH_IMPORT,
        "collection_method",
        problems,
    )
    occurred = parse_time(row["occurred_at"], "occurred_at", problems)
    expires = (
        parse_time(row["expires_at"], "expires_at", problems) if row.get("expires_at") else None
    )
    if occurred is not None and expires is not None and expires <= occurred:
        problems.append("expires_at must be after occurred_at")
    if expires is not None and status is not None and not status.is_valid:
        problems.append(f"expires_at applies only to given or renewed consent, not {status}")
    notice: Notice | None = None
    try:
        notice = Notice(row["notice_id"], row["notice_version"], row["notice_hash"])
    except ConsentValidationError as exc:
        problems.extend(exc.problems)
    if problems or occurred is None or purpose is None or status is None or channel is None:
        return ImportRowError(line, "; ".join(problems))
    return Change(
        purpose=purpose,
        event=status,
        legal_basis=basis,
        occurred_at=occurred,
        expires_at=expires,
        actor=actor,
        channel=channel,
        collection_method=method,
        notice=notice,
        line=line,
    )
