"""Consent routes: give, refuse, withdraw, renew, read, receipt, valid ids, coverage, import.

Officer keys act on every branch; a branch key only on its own branch's customers; a
researcher key only reads coverage counts.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, TypeVar

from fastapi import APIRouter, Body, HTTPException, Path, Query, status

from fedcrm.compliance._types import utcnow
from fedcrm.compliance.api.deps import (
    ROLE_ERRORS,
    CurrentAnyRole,
    CurrentCustomerReader,
    CurrentOfficer,
    RegistryDep,
    SettingsDep,
    ensure_branch,
    scope_branch,
)
from fedcrm.compliance.consent import ACTOR_PATTERN, NAME_PATTERN
from fedcrm.compliance.enums import Purpose
from fedcrm.compliance.schemas import (
    ConsentEraseCreate,
    ConsentGiveCreate,
    ConsentRecordPublic,
    ConsentRefuseCreate,
    ConsentRenewCreate,
    ConsentStatusPublic,
    ConsentWithdrawCreate,
    CoveragePublic,
    ErrorPublic,
    ImportSummaryPublic,
    PurposeStatusPublic,
    ReceiptPublic,
    ValidIdsPublic,
)

router = APIRouter(prefix="/consent", tags=["consent"])

BranchPath = Annotated[str, Path(pattern=NAME_PATTERN, description="The branch.")]
CustomerPath = Annotated[
    str, Path(pattern=NAME_PATTERN, description="The customer's pseudonymous id.")
]
AtQuery = Annotated[
    datetime | None, Query(description="Time of the question, ISO 8601 with offset (now).")
]

_ERRORS: dict[int | str, dict[str, object]] = {
    **ROLE_ERRORS,
    404: {"model": ErrorPublic, "description": "No consent record for this customer."},
    409: {"model": ErrorPublic, "description": "The change does not follow from the status."},
    410: {"model": ErrorPublic, "description": "The customer was erased."},
    422: {"model": ErrorPublic, "description": "Invalid request (every problem listed)."},
}


_Change = TypeVar("_Change", bound=Callable[..., ConsentRecordPublic])


def _change(action: str) -> Callable[[_Change], _Change]:
    """Register a consent change: ``POST /{branch}/customers/{customer_id}/<action>``, 201."""
    return router.post(
        f"/{{branch}}/customers/{{customer_id}}/{action}",
        responses=_ERRORS,
        status_code=status.HTTP_201_CREATED,
    )


def _aware(at: datetime | None) -> datetime:
    if at is None:
        return utcnow()
    if at.tzinfo is None or at.utcoffset() is None:
        raise HTTPException(
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail="'at' must carry a time-zone offset, e.g. 2026-01-31T12:00:00Z",
        )
    return at


@_change("give")
def give_consent(
    branch: BranchPath,
    customer_id: CustomerPath,
    body: ConsentGiveCreate,
    principal: CurrentCustomerReader,
    registry: RegistryDep,
) -> ConsentRecordPublic:
    """Record that the customer gave consent for one or more purposes."""
    ensure_branch(principal, branch)
    view = registry.give(
        branch=branch,
        subject=customer_id,
        purposes=body.legal_bases(),
        notice=body.notice.to_domain(),
        channel=body.channel,
        actor=body.actor,
        collection_method=body.collection_method,
        expires_at=body.expires_at,
        at=body.at,
    )
    return ConsentRecordPublic.from_domain(view)


@_change("refuse")
def refuse_consent(
    branch: BranchPath,
    customer_id: CustomerPath,
    body: ConsentRefuseCreate,
    principal: CurrentCustomerReader,
    registry: RegistryDep,
) -> ConsentRecordPublic:
    """Record that the customer was asked and refused."""
    ensure_branch(principal, branch)
    view = registry.refuse(
        branch=branch,
        subject=customer_id,
        purposes=body.legal_bases(),
        notice=body.notice.to_domain(),
        channel=body.channel,
        actor=body.actor,
        collection_method=body.collection_method,
        at=body.at,
    )
    return ConsentRecordPublic.from_domain(view)


@_change("withdraw")
def withdraw_consent(
    branch: BranchPath,
    customer_id: CustomerPath,
    body: ConsentWithdrawCreate,
    principal: CurrentCustomerReader,
    registry: RegistryDep,
) -> ConsentRecordPublic:
    """Withdraw consent (every given purpose unless ``purposes`` names some)."""
    ensure_branch(principal, branch)
    view = registry.withdraw(
        branch=branch,
        subject=customer_id,
        channel=body.channel,
        actor=body.actor,
        purposes=body.purposes,
        at=body.at,
    )
    return ConsentRecordPublic.from_domain(view)


@_change("renew")
def renew_consent(
    branch: BranchPath,
    customer_id: CustomerPath,
    body: ConsentRenewCreate,
    principal: CurrentCustomerReader,
    registry: RegistryDep,
) -> ConsentRecordPublic:
    """Renew given (possibly expired) consent with a new expiry."""
    ensure_branch(principal, branch)
    view = registry.renew(
        branch=branch,
        subject=customer_id,
        channel=body.channel,
        actor=body.actor,
        expires_at=body.expires_at,
        purposes=body.purposes,
        notice=None if body.notice is None else body.notice.to_domain(),
        at=body.at,
    )
    return ConsentRecordPublic.from_domain(view)


@router.post("/{branch}/customers/{customer_id}/erase", responses=_ERRORS)
def erase_customer(
    branch: BranchPath,
    customer_id: CustomerPath,
    body: ConsentEraseCreate,
    principal: CurrentOfficer,
    registry: RegistryDep,
) -> ConsentRecordPublic:
    """Erase a customer (officer only): crypto-shred their audit bodies, void their consent.

    The pseudonymous history stays as evidence; a second erasure answers 410.
    """
    registry.erase(branch=branch, subject=customer_id, reason=body.reason)
    return ConsentRecordPublic.from_domain(registry.record(branch=branch, subject=customer_id))


@router.get("/{branch}/customers/{customer_id}", responses=_ERRORS)
def read_record(
    branch: BranchPath,
    customer_id: CustomerPath,
    principal: CurrentCustomerReader,
    registry: RegistryDep,
) -> ConsentRecordPublic:
    """Return the customer's consent record with its whole history."""
    ensure_branch(principal, branch)
    return ConsentRecordPublic.from_domain(registry.record(branch=branch, subject=customer_id))


@router.get("/{branch}/customers/{customer_id}/status", responses=_ERRORS)
def read_status(
    branch: BranchPath,
    customer_id: CustomerPath,
    principal: CurrentCustomerReader,
    registry: RegistryDep,
    at: AtQuery = None,
) -> ConsentStatusPublic:
    """Return the customer's status per purpose at a time (default now)."""
    ensure_branch(principal, branch)
    moment = _aware(at)
    view = registry.record(branch=branch, subject=customer_id)
    return ConsentStatusPublic(
        branch=branch,
        customer_id=customer_id,
        at=moment,
        erased=view.erased,
        purposes=PurposeStatusPublic.of_record(view, moment),
    )


@router.get("/{branch}/customers/{customer_id}/receipt", responses=_ERRORS)
def read_receipt(
    branch: BranchPath,
    customer_id: CustomerPath,
    principal: CurrentCustomerReader,
    registry: RegistryDep,
) -> ReceiptPublic:
    """Return the customer's JSON consent receipt."""
    ensure_branch(principal, branch)
    return ReceiptPublic.model_validate(registry.receipt(branch=branch, subject=customer_id))


@router.get("/{branch}/valid", responses=_ERRORS)
def valid_ids(
    branch: BranchPath,
    purpose: Purpose,
    principal: CurrentCustomerReader,
    registry: RegistryDep,
    at: AtQuery = None,
) -> ValidIdsPublic:
    """Return the pseudonymous ids whose consent for ``purpose`` is valid (the consent gate)."""
    ensure_branch(principal, branch)
    moment = _aware(at)
    ids = sorted(registry.valid_for(branch, purpose, moment))
    return ValidIdsPublic(
        branch=branch, purpose=purpose, at=moment, count=len(ids), customer_ids=ids
    )


@router.get("/coverage", responses=_ERRORS)
def coverage(
    principal: CurrentAnyRole,
    registry: RegistryDep,
    branch: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    at: AtQuery = None,
) -> list[CoveragePublic]:
    """Return consent counts per branch and purpose (aggregates; a branch key: its own)."""
    scoped = scope_branch(principal, branch)
    counts = registry.coverage(at=_aware(at), branch=scoped)
    return [CoveragePublic.model_validate(count) for count in counts]


@router.post(
    "/{branch}/import",
    responses={
        **_ERRORS,
        413: {"model": ErrorPublic, "description": "The file is too large."},
        422: {"model": ErrorPublic, "description": "Refused; every bad row is listed."},
    },
    status_code=status.HTTP_201_CREATED,
)
def import_csv(
    branch: BranchPath,
    principal: CurrentCustomerReader,
    registry: RegistryDep,
    settings: SettingsDep,
    csv_text: Annotated[
        str,
        Body(
            media_type="text/csv",
            description="The branch's consent CSV (UTF-8), all or nothing.",
        ),
    ],
    actor: Annotated[str, Query(pattern=ACTOR_PATTERN)] = "branch-import",
) -> ImportSummaryPublic:
    """Import a branch's consent CSV: every row is checked, nothing is half-imported."""
    ensure_branch(principal, branch)
    if len(csv_text.encode("utf-8")) > settings.max_upload_bytes:
        raise HTTPException(
            status_code=status.HTTP_413_CONTENT_TOO_LARGE,
            detail=f"the file exceeds {settings.max_upload_bytes} bytes; split it",
        )
    summary = registry.import_csv(branch=branch, source=csv_text, actor=actor)
    return ImportSummaryPublic.model_validate(summary)
