"""The compliance service's app factory and its one domain-error handler.

``create_app()`` opens (and migrates) the store named by the settings, builds the services once
and mounts the routers, the officer's pages (``/pages/``) and their assets (``/static``). Every
:class:`~fedcrm.compliance.errors.ComplianceError` is mapped to an HTTP status in
:data:`ERROR_STATUS` by a single handler, and request-validation errors use the same body
(:class:`~fedcrm.compliance.schemas.ErrorPublic`), listing every problem.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedcrm.compliance.api.deps import KEY_ERRORS, CurrentPrincipal, Services
from fedcrm.compliance.api.routes import audit, consent, ledger, lineage, pages, ropa
from fedcrm.compliance.core.config import Settings, get_settings
from fedcrm.compliance.db import open_store
from fedcrm.compliance.errors import (
    ApiKeyError,
    AuditError,
    AuditIntegrityError,
    ComplianceError,
    ConsentImportError,
    ConsentNotFound,
    ConsentStateError,
    ConsentValidationError,
    LedgerError,
    StoreError,
    SubjectShredded,
)
from fedcrm.compliance.schemas import ErrorPublic, ImportRowErrorPublic, PrincipalPublic
from fedcrm.compliance.web import STATIC_DIR

logger = logging.getLogger(__name__)

ERROR_STATUS: tuple[tuple[type[ComplianceError], int], ...] = (
    (ConsentNotFound, status.HTTP_404_NOT_FOUND),
    (ConsentImportError, status.HTTP_422_UNPROCESSABLE_CONTENT),
    (ConsentValidationError, status.HTTP_422_UNPROCESSABLE_CONTENT),
    (ConsentStateError, status.HTTP_409_CONFLICT),
    (SubjectShredded, status.HTTP_410_GONE),
    (ApiKeyError, status.HTTP_422_UNPROCESSABLE_CONTENT),
    (AuditIntegrityError, status.HTTP_500_INTERNAL_SERVER_ERROR),
    (AuditError, status.HTTP_404_NOT_FOUND),
    (LedgerError, status.HTTP_409_CONFLICT),
    (StoreError, status.HTTP_503_SERVICE_UNAVAILABLE),
)
"""Domain error → HTTP status, first match wins (subclasses before their bases)."""


def status_for(error: ComplianceError) -> int:
    """Return the HTTP status of a domain error (400 for one not listed)."""
    for error_type, code in ERROR_STATUS:
        if isinstance(error, error_type):
            return code
    return status.HTTP_400_BAD_REQUEST


async def _compliance_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, ComplianceError):  # pragma: no cover - registered for it only
        raise exc
    code = status_for(exc)
    if isinstance(exc, ConsentImportError):
        body = ErrorPublic(
            detail=f"consent import refused, nothing imported: {len(exc.errors)} bad row(s)",
            errors=[ImportRowErrorPublic.model_validate(e) for e in exc.errors],
        )
    elif isinstance(exc, ConsentValidationError):
        body = ErrorPublic(detail="invalid consent change", problems=exc.problems)
    else:
        body = ErrorPublic(detail=str(exc))
    if code >= 500:
        logger.error("%s on %s %s", type(exc).__name__, request.method, request.url.path)
    return JSONResponse(status_code=code, content=body.model_dump(mode="json"))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):  # pragma: no cover
        raise exc
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()))
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    body = ErrorPublic(detail="invalid request", problems=problems)
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, content=body.model_dump(mode="json")
    )


class BodySizeLimit:
    """Pure ASGI middleware: refuse request bodies over ``max_bytes`` with 413.

    A declared ``Content-Length`` over the limit is refused before anything is read; a body
    without one (chunked) is buffered up to the limit, refused once it passes it, and otherwise
    replayed to the app.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = ErrorPublic(detail=f"the request body exceeds {self.max_bytes} bytes")
        response = JSONResponse(
            status_code=status.HTTP_413_CONTENT_TOO_LARGE, content=body.model_dump(mode="json")
        )
        await response(scope, receive, send)


def create_app(
    settings: Settings | None = None, *, store: sessionmaker[Session] | None = None
) -> FastAPI:
    """Build the compliance service.

    Args:
        settings: Defaults to :func:`get_settings` (the environment).
        store: An open store; by default the one at ``settings.database_url`` is opened and
            migrated to head.

    Raises:
        StoreError: The store cannot be opened or migrated.
    """
    chosen = get_settings() if settings is None else settings
    factory = open_store(chosen.database_url) if store is None else store
    app = FastAPI(
        title="fedcrm compliance service",
        summary="Consent registry, privacy ledger, tamper-evident audit log, Art. 30 records.",
        version="1",
        docs_url="/docs" if chosen.docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if chosen.docs else None,
    )
    app.state.services = Services.over(factory)
    app.dependency_overrides[get_settings] = lambda: chosen
    app.add_exception_handler(ComplianceError, _compliance_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for module in (consent, ledger, audit, lineage, ropa, pages):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(BodySizeLimit, max_bytes=chosen.max_upload_bytes)

    @app.get("/health", tags=["service"])
    def health() -> dict[str, str]:
        """Liveness check (no authentication, no data)."""
        return {"status": "ok"}

    @app.get(
        "/me",
        tags=["service"],
        responses=KEY_ERRORS,
    )
    def me(principal: CurrentPrincipal) -> PrincipalPublic:
        """Return the role (and branch) of the calling API key."""
        return PrincipalPublic.model_validate(principal)

    return app
