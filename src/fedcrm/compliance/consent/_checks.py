"""Field checks of the consent registry: names, pseudonyms and times, every problem collected."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from fedcrm.compliance.audit._events import validate_subject_ref

NAME_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}$"
"""Branches, customer ids (pseudonyms) and notice ids."""
ACTOR_PATTERN = r"^[A-Za-z0-9_.:/\-]{1,128}$"
"""Who recorded a change: ``customer`` or a staff pseudonym such as ``b1/clerk-17``."""

NAME = re.compile(NAME_PATTERN)
ACTOR = re.compile(ACTOR_PATTERN)


def check_name(value: object, name: str, problems: list[str], pattern: re.Pattern[str]) -> None:
    """Add a problem unless ``value`` is a string matching ``pattern`` (``NAME`` or ``ACTOR``)."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        allowed = "letters, digits and _.:-" + ("/" if pattern is ACTOR else "")
        problems.append(f"{name} must be 1-128 characters: {allowed}")


def check_subject(subject: object, problems: list[str]) -> None:
    """Add a problem unless ``subject`` is a valid pseudonymous customer id."""
    try:
        if not isinstance(subject, str):
            raise ValueError("the customer id must be a string")
        validate_subject_ref(subject)
    except ValueError as exc:
        problems.append(f"customer id: {exc}")


def aware(value: datetime | None, name: str, problems: list[str]) -> datetime | None:
    """Return ``value`` in UTC; None (after adding a problem) if it is naive."""
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        problems.append(f"{name} must be timezone-aware (e.g. 2026-01-31T12:00:00Z)")
        return None
    return value.astimezone(UTC)


def parse_time(text: str, name: str, problems: list[str]) -> datetime | None:
    """Return the aware time an ISO 8601 text names; None (after adding a problem) if it cannot."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        problems.append(f"{name} {text!r} is not an ISO 8601 time (e.g. 2026-01-31T12:00:00Z)")
        return None
    return aware(value, name, problems)


def format_time(value: datetime | None) -> str | None:
    """Return a time as ISO 8601 in UTC (None stays None), as receipts and audit bodies hold it."""
    return None if value is None else value.astimezone(UTC).isoformat()
