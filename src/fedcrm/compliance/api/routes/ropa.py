"""Records of processing activities (GDPR Art. 30), generated from the running configuration."""

from __future__ import annotations

from fastapi import APIRouter

from fedcrm.compliance._types import utcnow
from fedcrm.compliance.api.deps import OFFICER_ERRORS, CurrentOfficer, RegistryDep, SettingsDep
from fedcrm.compliance.schemas import RopaPublic

router = APIRouter(prefix="/ropa", tags=["records of processing"])


@router.get("", responses=OFFICER_ERRORS)
def records_of_processing(
    principal: CurrentOfficer, settings: SettingsDep, registry: RegistryDep
) -> RopaPublic:
    """Return the Art. 30(1) records: one per purpose, with branches and security measures.

    Branches are those configured plus every branch with consent records in the store. The
    records come from the run configuration the service was started with (``--run``); without
    one, they say that no run configuration was loaded and list no measure as in force.
    """
    config = settings.ropa
    branches = sorted(set(config.branches) | set(registry.branches()))
    return RopaPublic.from_config(config, branches, utcnow())
