"""Lineage routes: which runs, rounds and models used which branch's round manifests.

Officer: everything. Branch key: its own branch's manifests and uses, and checks of its own
customers' membership proofs. Researcher: per-run aggregates and model releases only.
Manifests carry roots and counts, never a customer id; a customer's own lineage is answered on
the branch (``fedcrm compliance lineage --customer``), which holds the salts.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status

from fedcrm.compliance.api.deps import (
    ROLE_ERRORS,
    CurrentAnyRole,
    CurrentCustomerReader,
    NameQuery,
    ServicesDep,
    ensure_branch,
    scope_branch,
)
from fedcrm.compliance.consent import NAME_PATTERN
from fedcrm.compliance.errors import ManifestError, ProofError
from fedcrm.compliance.lineage import LineageStore
from fedcrm.compliance.manifest import verify_membership
from fedcrm.compliance.schemas import (
    ErrorPublic,
    LineageRunPublic,
    ManifestPublic,
    MembershipCheckCreate,
    MembershipCheckPublic,
    ModelReleasePublic,
    RoundUsePublic,
)

router = APIRouter(prefix="/lineage", tags=["lineage"])


def _store(services: ServicesDep) -> LineageStore:
    return LineageStore(services.factory, audit=services.audit)


@router.get("/runs", responses=ROLE_ERRORS)
def runs(principal: CurrentAnyRole, services: ServicesDep) -> list[LineageRunPublic]:
    """Return per-run aggregates: rounds, branches, manifests, rows used and excluded, models."""
    return [LineageRunPublic.model_validate(run) for run in _store(services).runs()]


@router.get("/releases", responses=ROLE_ERRORS)
def releases(
    principal: CurrentAnyRole, services: ServicesDep, run_id: NameQuery = None
) -> list[ModelReleasePublic]:
    """Return released models (file hash and last round included)."""
    found = _store(services).releases(run_id=run_id)
    return [ModelReleasePublic.model_validate(release) for release in found]


@router.get("/manifests", responses=ROLE_ERRORS)
def manifests(
    principal: CurrentCustomerReader,
    services: ServicesDep,
    branch: NameQuery = None,
    run_id: NameQuery = None,
) -> list[ManifestPublic]:
    """Return recorded round manifests (a branch key: its own branch's)."""
    scoped = scope_branch(principal, branch)
    found = _store(services).manifests(branch=scoped, run_id=run_id)
    return [ManifestPublic.model_validate(record) for record in found]


@router.get("/branches/{branch}/uses", responses=ROLE_ERRORS)
def uses(
    branch: Annotated[str, Path(pattern=NAME_PATTERN)],
    principal: CurrentCustomerReader,
    services: ServicesDep,
    run_id: NameQuery = None,
) -> list[RoundUsePublic]:
    """Return every round that used the branch's data, with the models that include it."""
    ensure_branch(principal, branch)
    found = _store(services).uses(branch=branch, run_id=run_id)
    return [RoundUsePublic.model_validate(use) for use in found]


@router.post(
    "/membership",
    responses={**ROLE_ERRORS, 404: {"model": ErrorPublic, "description": "No such manifest."}},
)
def check_membership(
    body: MembershipCheckCreate, principal: CurrentCustomerReader, services: ServicesDep
) -> MembershipCheckPublic:
    """Check a branch's inclusion proof for a customer against the root recorded for the round."""
    ensure_branch(principal, body.branch)
    recorded = [
        record
        for record in _store(services).manifests(branch=body.branch, run_id=body.run_id)
        if record.round == body.round
    ]
    if not recorded:
        raise HTTPException(
            status_code=status.HTTP_404_NOT_FOUND,
            detail=f"no manifest recorded for branch {body.branch!r}, run {body.run_id!r}, "
            f"round {body.round}",
        )
    record = recorded[0]
    try:
        verify_membership(
            customer=body.customer_id,
            salt=bytes.fromhex(body.salt),
            root=record.manifest.root,
            leaf_index=body.leaf_index,
            tree_size=body.tree_size,
            proof=list(body.proof),
        )
    except (ProofError, ManifestError) as exc:
        return MembershipCheckPublic(
            verified=False,
            root=record.manifest.root,
            audit_index=record.audit_index,
            detail=str(exc),
        )
    return MembershipCheckPublic(
        verified=True,
        root=record.manifest.root,
        audit_index=record.audit_index,
        detail="the customer's commitment is in the recorded manifest",
    )
