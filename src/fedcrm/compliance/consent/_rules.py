"""The status rules every consent change must follow (import included).

* ``given``: not while the purpose is validly given (use ``renewed``);
* ``refused``: not while the purpose is validly given (use ``withdrawn``);
* ``withdrawn``: only while validly given (given or renewed, before expiry);
* ``renewed``: only after ``given`` or ``renewed`` (expired included), never after a
  withdrawal or refusal (that needs a new ``given``);
* no event may be dated before the purpose's latest recorded event;
* an erased customer (audit key crypto-shredded) takes no further change.

A customer's consent for a purpose is *valid at t* when its latest event at ``t`` is ``given``
or ``renewed``, its expiry (if any) is after ``t``, and the customer was not erased.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from fedcrm.compliance.consent._checks import format_time
from fedcrm.compliance.consent._records import Notice
from fedcrm.compliance.enums import Channel, CollectionMethod, ConsentStatus, LegalBasis, Purpose

ERASED = "the customer was erased (crypto-shredded); no further consent is recorded"
"""Why any change of an erased customer is refused."""

NEEDS_RECORD = frozenset({ConsentStatus.WITHDRAWN, ConsentStatus.RENEWED})
"""Events that only follow an earlier one: a customer without a record is not found."""


@dataclass(frozen=True, slots=True)
class Change:
    """One requested event for one purpose, checked field by field but not yet by the rules.

    ``legal_basis``, ``collection_method`` and ``notice`` may be None: they are then carried
    over from the purpose's latest event. ``line`` is the CSV line of an imported row.
    """

    purpose: Purpose
    event: ConsentStatus
    legal_basis: LegalBasis | None
    occurred_at: datetime
    expires_at: datetime | None
    actor: str
    channel: Channel
    collection_method: CollectionMethod | None
    notice: Notice | None
    line: int = 0


@dataclass(slots=True)
class Latest:
    """The latest event of one customer and purpose: what the next change is checked against."""

    event: ConsentStatus
    legal_basis: LegalBasis
    occurred_at: datetime
    expires_at: datetime | None
    collection_method: CollectionMethod
    notice: Notice

    def valid_at(self, at: datetime) -> bool:
        """Whether the consent it records is valid at ``at`` (given or renewed, not expired)."""
        return self.event.is_valid and (self.expires_at is None or self.expires_at > at)


def transition_problem(latest: Latest | None, change: Change) -> str | None:
    """Return why ``change`` cannot follow ``latest`` (the module's rules), or None."""
    name = change.purpose.value
    if latest is not None and change.occurred_at < latest.occurred_at:
        return (
            f"{name}: the event is dated {format_time(change.occurred_at)}, before the latest "
            f"recorded event ({latest.event.value} at {format_time(latest.occurred_at)}); "
            "history is append-only"
        )
    valid = latest is not None and latest.valid_at(change.occurred_at)
    if change.event is ConsentStatus.GIVEN and valid:
        return f"{name}: consent is already given; renew it instead"
    if change.event is ConsentStatus.REFUSED and valid:
        return f"{name}: consent is currently given; withdraw it instead of refusing"
    if change.event is ConsentStatus.WITHDRAWN and not valid:
        current = "no consent" if latest is None else f"status {latest.event.value}"
        if latest is not None and latest.event.is_valid:
            current = "an expired consent"
        return f"{name}: nothing to withdraw ({current})"
    if change.event is ConsentStatus.RENEWED and (latest is None or not latest.event.is_valid):
        current = "no consent" if latest is None else f"status {latest.event.value}"
        return f"{name}: only a given or renewed consent can be renewed ({current}); give it anew"
    if change.event is ConsentStatus.EXPIRED and (latest is None or not latest.event.is_valid):
        return f"{name}: only a given or renewed consent can expire"
    if (
        change.event in (ConsentStatus.GIVEN, ConsentStatus.REFUSED)
        and change.notice is None
        and latest is None
    ):
        return f"{name}: a notice is required"
    return None
