"""Dependencies of the compliance service, as ``Annotated`` aliases.

The store, the registry, the ledger, the audit log and the key store live on
``app.state.services`` (built once by :func:`fedcrm.compliance.api.main.create_app`); tests
replace any of them with ``app.dependency_overrides``.

Authentication: an ``X-API-Key`` header (OpenAPI security scheme ``APIKeyHeader``). No key or an
unknown, revoked or malformed key → 401; a valid key with the wrong role, or a branch key asking
about another branch → 403.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request, Security, status
from fastapi.security import APIKeyHeader
from sqlalchemy.orm import Session, sessionmaker

from fedcrm.compliance.apikeys import ApiKeyStore, Principal
from fedcrm.compliance.audit._log import AuditLog
from fedcrm.compliance.consent import NAME_PATTERN, ConsentRegistry
from fedcrm.compliance.core.config import Settings, get_settings
from fedcrm.compliance.enums import Role
from fedcrm.compliance.ledger import PrivacyLedger
from fedcrm.compliance.schemas import ErrorPublic

API_KEY_HEADER = "X-API-Key"

KEY_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorPublic, "description": "No or invalid API key."},
}
"""OpenAPI ``responses`` of a route any valid key may call."""
ROLE_ERRORS: dict[int | str, dict[str, object]] = {
    **KEY_ERRORS,
    403: {"model": ErrorPublic, "description": "Wrong role, or another branch."},
}
"""OpenAPI ``responses`` of a route limited to some roles, a branch key to its own branch."""
OFFICER_ERRORS: dict[int | str, dict[str, object]] = {
    **KEY_ERRORS,
    403: {"model": ErrorPublic, "description": "Not an officer key."},
}
"""OpenAPI ``responses`` of an officer-only route."""

NameQuery = Annotated[str | None, Query(pattern=NAME_PATTERN)]
"""An optional filter by the name of a branch, model, run or purpose."""


@dataclass(frozen=True, slots=True)
class Services:
    """Everything the routes use, built once per app over one store."""

    factory: sessionmaker[Session]
    audit: AuditLog
    registry: ConsentRegistry
    ledger: PrivacyLedger
    keys: ApiKeyStore

    @classmethod
    def over(cls, factory: sessionmaker[Session]) -> Services:
        """Build the services over a migrated store."""
        audit = AuditLog(factory)
        return cls(
            factory=factory,
            audit=audit,
            registry=ConsentRegistry(factory, audit=audit),
            ledger=PrivacyLedger(factory, audit=audit),
            keys=ApiKeyStore(factory),
        )


def get_services(request: Request) -> Services:
    """Return the app's services."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_registry(services: ServicesDep) -> ConsentRegistry:
    """Return the consent registry."""
    return services.registry


def get_ledger(services: ServicesDep) -> PrivacyLedger:
    """Return the privacy ledger."""
    return services.ledger


def get_audit(services: ServicesDep) -> AuditLog:
    """Return the audit log."""
    return services.audit


def get_keys(services: ServicesDep) -> ApiKeyStore:
    """Return the API-key store."""
    return services.keys


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ConsentRegistry, Depends(get_registry)]
LedgerDep = Annotated[PrivacyLedger, Depends(get_ledger)]
AuditDep = Annotated[AuditLog, Depends(get_audit)]
KeysDep = Annotated[ApiKeyStore, Depends(get_keys)]

_api_key = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="An API key created with `fedcrm compliance apikey create`.",
)


def get_principal(
    keys: KeysDep, token: Annotated[str | None, Security(_api_key)] = None
) -> Principal:
    """Authenticate the caller.

    Raises:
        HTTPException: 401 without a key or with an invalid one.
    """
    principal = None if not token else keys.authenticate(token)
    if principal is None:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid API key" if token else f"missing {API_KEY_HEADER} header",
            headers={"WWW-Authenticate": API_KEY_HEADER},
        )
    return principal


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def _require(*roles: Role) -> object:
    def check(principal: CurrentPrincipal) -> Principal:
        if principal.role not in roles:
            allowed = ", ".join(role.value for role in roles)
            raise HTTPException(
                status_code=status.HTTP_403_FORBIDDEN,
                detail=f"this needs the role {allowed}; the key has {principal.role.value}",
            )
        return principal

    return Depends(check)


CurrentOfficer = Annotated[Principal, _require(Role.OFFICER)]
"""The officer: reads everything, administers consent."""
CurrentCustomerReader = Annotated[Principal, _require(Role.OFFICER, Role.BRANCH)]
"""Officer or branch: per-customer data (a branch: its own customers; see :func:`ensure_branch`)."""
CurrentAnyRole = Annotated[Principal, _require(Role.OFFICER, Role.BRANCH, Role.RESEARCHER)]
"""Any role: aggregates (a branch key sees its own branch's)."""


def ensure_branch(principal: Principal, branch: str) -> None:
    """Refuse a branch key asking about another branch.

    Raises:
        HTTPException: 403 for another branch.
    """
    if not principal.can_access_branch(branch):
        raise HTTPException(
            status_code=status.HTTP_403_FORBIDDEN,
            detail="this key may only access its own branch",
        )


def scope_branch(principal: Principal, branch: str | None) -> str | None:
    """Return the branch a query is limited to: a branch key's own, whatever was asked.

    Raises:
        HTTPException: 403 when a branch key asks for another branch.
    """
    if principal.role is Role.BRANCH:
        if branch is not None:
            ensure_branch(principal, branch)
        return principal.branch
    return branch
