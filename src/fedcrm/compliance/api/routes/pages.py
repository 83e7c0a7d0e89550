"""The officer's server-rendered pages: ε burn-down, consent coverage, audit status.

Every asset is in the package (:mod:`fedcrm.compliance.web`); the burn-down charts are inline
SVG computed here, so a page shows its numbers without any script.

Notes:
    Browsers cannot send the ``X-API-Key`` header on navigation, so the pages take the officer
    key once from a sign-in form and keep it in an HttpOnly, ``SameSite=Strict`` cookie scoped
    to ``/pages`` (``Secure`` over HTTPS). The cookie is accepted by these read-only pages
    only, never by the JSON API, so it cannot be used for cross-site writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import APIRouter, Cookie, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from fedcrm.compliance._types import utcnow
from fedcrm.compliance.api.deps import KeysDep, ServicesDep
from fedcrm.compliance.api.routes.ledger import burn_down_series
from fedcrm.compliance.enums import Role
from fedcrm.compliance.schemas import BurnDownPublic
from fedcrm.compliance.web import TEMPLATES_DIR

router = APIRouter(prefix="/pages", tags=["pages"], include_in_schema=False)
templates = Jinja2Templates(directory=TEMPLATES_DIR)

COOKIE = "fedcrm_officer_key"
_MAX_LOGIN_BODY = 4096


@dataclass(frozen=True, slots=True)
class ChartPoint:
    """One plotted round."""

    x: float
    y: float
    round: int
    run_id: str
    epsilon: float


@dataclass(frozen=True, slots=True)
class Tick:
    """A y-axis label."""

    y: float
    label: str


@dataclass(frozen=True, slots=True)
class BurnDownChart:
    """Geometry of one inline-SVG burn-down chart (cumulative ε per admitted round)."""

    branch: str
    model: str
    purpose: str
    spent: float
    budget: float | None
    refusals: int
    points: tuple[ChartPoint, ...]
    ticks: tuple[Tick, ...]
    budget_y: float | None
    width: int = 560
    height: int = 220
    left: int = 48
    right: int = 540
    top: int = 16
    bottom: int = 196

    @property
    def polyline(self) -> str:
        """The ``points`` attribute of the series' polyline."""
        return " ".join(f"{p.x:.1f},{p.y:.1f}" for p in self.points)


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return float(step * magnitude)
    return 10 * magnitude  # pragma: no cover - the loop always returns


def burn_down_chart(series: BurnDownPublic) -> BurnDownChart:
    """Lay out one burn-down series (the same numbers as ``GET /ledger/burn-down``)."""
    left, right, top, bottom = 48, 540, 16, 196
    values = [p.cumulative_epsilon for p in series.points]
    y_max = _nice_max(max([*values, series.budget or 0.0, 1e-9]))

    def y_of(value: float) -> float:
        return bottom - (bottom - top) * value / y_max

    count = len(series.points)
    span = right - left
    points = tuple(
        ChartPoint(
            x=left + (span * (index + 0.5) / count),
            y=y_of(point.cumulative_epsilon),
            round=point.round,
            run_id=point.run_id,
            epsilon=point.cumulative_epsilon,
        )
        for index, point in enumerate(series.points)
    )
    ticks = tuple(Tick(y=y_of(y_max * k / 4), label=f"{y_max * k / 4:.3g}") for k in range(5))
    return BurnDownChart(
        branch=series.branch,
        model=series.model,
        purpose=series.purpose,
        spent=series.spent,
        budget=series.budget,
        refusals=series.refusals,
        points=points,
        ticks=ticks,
        budget_y=None if series.budget is None else y_of(series.budget),
    )


def _login_page(request: Request, error: str | None, code: int = 200) -> HTMLResponse:
    return templates.TemplateResponse(
        request, "login.html", {"error": error, "principal": None}, status_code=code
    )


@router.get("/login", response_class=HTMLResponse, name="pages_login")
def login_form(request: Request) -> HTMLResponse:
    """The sign-in form."""
    return _login_page(request, None)


@router.post("/login", response_class=HTMLResponse, name="pages_login_submit")
async def login(request: Request, keys: KeysDep) -> Response:
    """Check an officer key and keep it in the pages' cookie."""
    body = await request.body()
    if len(body) > _MAX_LOGIN_BODY:
        return _login_page(request, "request too large", status.HTTP_413_CONTENT_TOO_LARGE)
    token = parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0].strip()
    principal = keys.authenticate(token) if token else None
    if principal is None:
        return _login_page(request, "unknown or revoked key", status.HTTP_401_UNAUTHORIZED)
    if principal.role is not Role.OFFICER:
        return _login_page(request, "these pages are for officer keys", status.HTTP_403_FORBIDDEN)
    response = RedirectResponse(request.url_for("pages_overview"), status.HTTP_303_SEE_OTHER)
    response.set_cookie(
        COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/pages",
    )
    return response


@router.get("/", response_class=HTMLResponse, name="pages_overview")
def overview(
    request: Request,
    services: ServicesDep,
    keys: KeysDep,
    token: Annotated[str | None, Cookie(alias=COOKIE)] = None,
) -> Response:
    """ε burn-down per branch and model, consent coverage, audit status."""
    principal = keys.authenticate(token) if token else None
    if principal is None:
        return RedirectResponse(request.url_for("pages_login"), status.HTTP_303_SEE_OTHER)
    if principal.role is not Role.OFFICER:
        return _login_page(request, "these pages are for officer keys", status.HTTP_403_FORBIDDEN)
    report = services.audit.verify()
    latest = services.audit.latest_checkpoint()
    audit = {
        "tree_size": report.tree_size,
        "root_hash": report.root_hash.hex(),
        "latest_checkpoint": latest,
        "checkpoint_time": None
        if latest is None
        else latest.checkpoint.timestamp.strftime("%Y-%m-%d %H:%M:%S"),
        "verified": report.ok,
        "verified_at": utcnow().strftime("%Y-%m-%d %H:%M:%S"),
        "issues": [str(issue) for issue in report.issues],
    }
    charts = [burn_down_chart(series) for series in burn_down_series(services.ledger.entries())]
    context = {
        "principal": principal,
        "generated_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "audit": audit,
        "charts": charts,
        "coverage": services.registry.coverage(),
    }
    return templates.TemplateResponse(request, "overview.html", context)
