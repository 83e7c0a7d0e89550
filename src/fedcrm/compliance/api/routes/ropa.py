"""Records of processing activities (GDPR Art. 30), generated from the running configuration."""

from __future__ import annotations

from fastapi import APIRouter

from fedcrm.compliance._types import utcnow
from fedcrm.compliance.api.deps import OFFICER_ERRORS, CurrentOfficer, RegistryDep, SettingsDep
from fedcrm.compliance.schemas import RopaPublic, RopaRecordPublic

router = APIRouter(prefix="/ropa", tags=["records of processing"])


@router.get("", responses=OFFICER_ERRORS)
def records_of_processing(
    principal: CurrentOfficer, settings: SettingsDep, registry: RegistryDep
) -> RopaPublic:
    """Return the Art. 30(1) records: one per purpose, with branches and security measures.

    Branches are those configured plus every branch with consent records in the store.
    """
    config = settings.ropa
    branches = sorted(set(config.branches) | set(registry.branches()))
    return RopaPublic(
        generated_at=utcnow(),
        controller=config.controller,
        branches=branches,
        records=[
            RopaRecordPublic.from_config(activity, branches, config.security)
            for activity in config.activities
        ],
        security=config.security,
    )
