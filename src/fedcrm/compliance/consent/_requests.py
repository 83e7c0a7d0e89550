"""Checking the arguments of one customer's change into one :class:`Change` per purpose."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from fedcrm.compliance._types import utcnow
from fedcrm.compliance.consent._checks import ACTOR, NAME, aware, check_name, check_subject
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
from fedcrm.compliance.errors import ConsentValidationError

PurposeSelection = (
    Mapping[Purpose, LegalBasis | str] | Mapping[str, LegalBasis | str] | Iterable[Purpose | str]
)
"""Purposes with their legal basis, or purposes alone (legal basis ``consent``)."""


def moment(at: datetime | None) -> datetime:
    """Return ``at`` in UTC, or now.

    Raises:
        ConsentValidationError: ``at`` is naive.
    """
    if at is None:
        return utcnow()
    problems: list[str] = []
    checked = aware(at, "at", problems)
    if checked is None:
        raise ConsentValidationError(problems)
    return checked


def requested_changes(
    event: ConsentStatus,
    *,
    branch: str,
    subject: str,
    purposes: PurposeSelection,
    channel: Channel | str,
    actor: str,
    at: datetime | None,
    notice: Notice | None = None,
    collection_method: CollectionMethod | str | None = None,
    expires_at: datetime | None = None,
) -> list[Change]:
    """Check a change's arguments and return one change per purpose (not yet by the rules).

    A purpose given or refused without a legal basis is processed under ``consent``; the
    other events carry the basis (and a missing notice or method) over from the latest event.

    Raises:
        ConsentValidationError: Listing every malformed argument.
    """
    problems: list[str] = []
    check_name(branch, "branch", problems, NAME)
    check_subject(subject, problems)
    check_name(actor, "actor", problems, ACTOR)
    occurred = utcnow() if at is None else aware(at, "at", problems)
    expiry = aware(expires_at, "expires_at", problems)
    chan = coerce_member(Channel, channel, "channel", problems)
    method = (
        None
        if collection_method is None
        else coerce_member(CollectionMethod, collection_method, "collection_method", problems)
    )
    pairs: list[tuple[Any, Any]]
    if isinstance(purposes, Mapping):
        pairs = list(purposes.items())
    elif isinstance(purposes, str):
        pairs = [(purposes, None)]
    else:
        pairs = [(p, None) for p in purposes]
    if not pairs:
        problems.append("at least one purpose is required")
    parsed: list[tuple[Purpose, LegalBasis | None]] = []
    for raw_purpose, raw_basis in pairs:
        purpose = coerce_member(Purpose, raw_purpose, "purpose", problems)
        basis = (
            None if raw_basis is None else coerce_member(LegalBasis, raw_basis, "basis", problems)
        )
        if purpose is not None:
            parsed.append((purpose, basis))
    if len({p for p, _ in parsed}) != len(parsed):
        problems.append("a purpose is listed twice")
    if occurred is not None and expiry is not None and expiry <= occurred:
        problems.append("expires_at must be after the time of the event")
    if problems or occurred is None or chan is None:
        raise ConsentValidationError(problems)
    if event in (ConsentStatus.GIVEN, ConsentStatus.REFUSED):
        parsed = [(p, b if b is not None else LegalBasis.CONSENT) for p, b in parsed]
    return [
        Change(
            purpose=purpose,
            event=event,
            legal_basis=basis,
            occurred_at=occurred,
            expires_at=expiry,
            actor=actor,
            channel=chan,
            collection_method=method,
            notice=notice,
        )
        for purpose, basis in parsed
    ]
