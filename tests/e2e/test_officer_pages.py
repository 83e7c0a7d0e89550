"""The officer's pages in headless Chromium: they load, the charts render, numbers match the API."""

from __future__ import annotations

import shutil
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcrm.compliance import (
    LedgerEntry,
    Notice,
    open_store,
    sqlite_url,
)
from fedcrm.compliance.api import create_app
from fedcrm.compliance.api.deps import Services
from fedcrm.compliance.core.config import Settings
from support import ledger_entry

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
"""The Debian package's browser (``apt-get install -y chromium``); never a downloaded one."""
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package (dev dependency) is not installed"
)
if shutil.which(CHROMIUM) is None:
    pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium", allow_module_level=True)


@dataclass
class Served:
    base: str
    token: str


def _entry(branch: str, model: str, round_: int, cumulative: float, budget: float) -> LedgerEntry:
    return ledger_entry(
        round=round_,
        branch=branch,
        model=model,
        sampling_rate=0.05,
        steps=20,
        epsilon=0.7,
        cumulative_epsilon=cumulative,
        epsilon_budget=budget,
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    url = sqlite_url(Path(tmp_path_factory.mktemp("e2e")) / "compliance.db")
    store = open_store(url)
    app = create_app(Settings(database_url=url), store=store)
    services: Services = app.state.services
    notice = Notice.from_text("n", "v1", "text")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    for branch, customers in (("b1", 5), ("b2", 3)):
        for i in range(customers):
            services.registry.give(
                branch=branch,
                subject=f"p_{branch}_{i}",
                purposes=["churn-model-training"],
                notice=notice,
                channel="web",
                actor="customer",
                at=t0,
            )
    services.registry.withdraw(
        branch="b1", subject="p_b1_0", channel="web", actor="customer", at=t0 + timedelta(1)
    )
    for round_, cumulative in enumerate((0.7, 1.3, 1.9, 2.4)):
        services.ledger.append(_entry("b1", "churn", round_, cumulative, 8.0))
    for round_, cumulative in enumerate((2.0, 4.5)):
        services.ledger.append(_entry("b2", "churn", round_, cumulative, 4.0))
    services.audit.checkpoint(Ed25519PrivateKey.generate())
    token = services.keys.create("officer", label="e2e")[1]

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", ws="none"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            pytest.fail("the compliance service did not start within 20 s")
        time.sleep(0.05)
    try:
        yield Served(f"http://127.0.0.1:{port}", token)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        store.kw["bind"].dispose()


def _api(served: Served, path: str) -> Any:
    response = httpx.get(served.base + path, headers={"X-API-Key": served.token}, timeout=10)
    response.raise_for_status()
    return response.json()


def test_pages_render_and_match_the_api(served: Served) -> None:
    requested: list[str] = []
    with warnings.catch_warnings(), sync_api.sync_playwright() as playwright:
        warnings.simplefilter("ignore", ResourceWarning)
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.goto(served.base + "/pages/")
            assert page.url.endswith("/pages/login")  # no cookie yet: sign in first
            page.fill("#token", served.token)
            page.click("button[type=submit]")
            page.wait_for_selector("figure.chart[data-ready=true]")
            assert page.title() == "fedcrm compliance"

            # ε burn-down: one chart per (branch, model, purpose), same numbers as the API.
            series = _api(served, "/ledger/burn-down")
            charts = page.query_selector_all("figure.chart")
            assert len(charts) == len(series) == 2
            for chart, expected in zip(charts, series, strict=True):
                assert chart.get_attribute("data-branch") == expected["branch"]
                assert float(chart.get_attribute("data-spent") or "nan") == expected["spent"]
                assert float(chart.get_attribute("data-budget") or "nan") == expected["budget"]
                plotted = [
                    float(point.get_attribute("data-epsilon") or "nan")
                    for point in chart.query_selector_all("circle.point")
                ]
                assert plotted == [p["cumulative_epsilon"] for p in expected["points"]]
                polyline = chart.query_selector("polyline.series")
                assert polyline is not None
                box = polyline.bounding_box()
                assert box is not None and box["width"] > 100 and box["height"] > 10
                assert chart.query_selector("line.budget-line") is not None
            # The series rises: later rounds are drawn higher (smaller y).
            ys = [
                float(p.get_attribute("cy") or "nan")
                for p in charts[0].query_selector_all("circle.point")
            ]
            assert ys == sorted(ys, reverse=True)
            # The script ran: hovering a point shows its value.
            charts[0].query_selector_all("circle.point")[-1].hover()
            assert "2.4" in (charts[0].query_selector("output.readout").inner_text() or "")

            # Consent coverage table equals the API's counts.
            coverage = _api(served, "/consent/coverage")
            for item in coverage:
                selector = f"tr[data-branch='{item['branch']}'][data-purpose='{item['purpose']}']"
                row = page.query_selector(f"#coverage {selector}")
                assert row is not None
                assert int(row.query_selector("td.valid").inner_text()) == item["valid"]
                assert int(row.query_selector("td.customers").inner_text()) == item["customers"]

            # Audit status equals the API's.
            audit = _api(served, "/audit/status")
            assert int(page.inner_text("#audit-size")) == audit["tree_size"]
            assert page.inner_text("#audit-verified").startswith("verified")
            assert f"size {audit['latest_checkpoint']['tree_size']}" in page.inner_text(
                "#audit-checkpoint"
            )
        finally:
            browser.close()
    # Every asset came from the service itself: no CDN, no other host.
    assert requested
    assert all(url.startswith(served.base) for url in requested), requested
