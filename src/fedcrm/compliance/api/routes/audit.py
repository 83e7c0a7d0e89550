"""Audit-log routes (officer only): status, checkpoints, inclusion and consistency proofs, export.

Bodies are never served: they are encrypted per customer, and the export holds ciphertexts
only, exactly what ``fedcrm audit verify`` checks offline.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Response

from fedcrm.compliance._types import utcnow
from fedcrm.compliance.api.deps import OFFICER_ERRORS, AuditDep, CurrentOfficer
from fedcrm.compliance.schemas import (
    AuditStatusPublic,
    CheckpointPublic,
    ConsistencyProofPublic,
    ErrorPublic,
    InclusionProofPublic,
)

router = APIRouter(prefix="/audit", tags=["audit"])

_PROOF_ERRORS: dict[int | str, dict[str, object]] = {
    **OFFICER_ERRORS,
    404: {"model": ErrorPublic, "description": "Index or tree size out of range."},
}
Size = Annotated[int, Query(ge=0, le=2**62)]


@router.get("/status", responses=OFFICER_ERRORS)
def audit_status(principal: CurrentOfficer, audit: AuditDep) -> AuditStatusPublic:
    """Verify the stored log now and return its size, root and latest checkpoint."""
    report = audit.verify()
    latest = audit.latest_checkpoint()
    return AuditStatusPublic(
        tree_size=report.tree_size,
        root_hash=report.root_hash.hex(),
        latest_checkpoint=None if latest is None else CheckpointPublic.from_domain(latest),
        entries_since_checkpoint=report.tree_size - (0 if latest is None else latest.tree_size),
        verified=report.ok,
        verified_at=utcnow(),
        issues=[str(issue) for issue in report.issues],
        warnings=list(report.warnings),
    )


@router.get("/checkpoints", responses=OFFICER_ERRORS)
def checkpoints(principal: CurrentOfficer, audit: AuditDep) -> list[CheckpointPublic]:
    """Return every signed checkpoint, oldest first."""
    return [CheckpointPublic.from_domain(checkpoint) for checkpoint in audit.checkpoints()]


@router.get("/proofs/inclusion", responses=_PROOF_ERRORS)
def inclusion_proof(
    principal: CurrentOfficer,
    audit: AuditDep,
    index: Size,
    tree_size: Annotated[int | None, Query(ge=1, le=2**62)] = None,
) -> InclusionProofPublic:
    """Return the inclusion proof of entry ``index`` in the tree of ``tree_size`` entries."""
    proof = audit.inclusion_proof(index, tree_size)
    return InclusionProofPublic.from_domain(proof, audit.root(proof.tree_size))


@router.get("/proofs/consistency", responses=_PROOF_ERRORS)
def consistency_proof(
    principal: CurrentOfficer,
    audit: AuditDep,
    first: Size,
    second: Annotated[int | None, Query(ge=0, le=2**62)] = None,
) -> ConsistencyProofPublic:
    """Return the proof that the tree of ``second`` entries extends that of ``first``."""
    proof = audit.consistency_proof(first, second)
    return ConsistencyProofPublic.from_domain(
        proof, audit.root(proof.first), audit.root(proof.second)
    )


@router.get(
    "/export",
    responses={
        **OFFICER_ERRORS,
        200: {
            "content": {"application/x-ndjson": {}},
            "description": "The log as JSON lines, for `fedcrm audit verify`.",
        },
    },
    response_class=Response,
)
def export(principal: CurrentOfficer, audit: AuditDep) -> Response:
    """Export the whole log (ciphertexts, checkpoints, public keys) for offline verification."""
    with tempfile.TemporaryDirectory() as folder:
        path = audit.export(Path(folder) / "audit-log.jsonl")
        content = path.read_bytes()
    return Response(
        content=content,
        media_type="application/x-ndjson",
        headers={"Content-Disposition": 'attachment; filename="audit-log.jsonl"'},
    )
