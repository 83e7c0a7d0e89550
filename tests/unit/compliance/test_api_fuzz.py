"""Every endpoint fuzzed with schemathesis against the OpenAPI schema: never a 5xx.

The store is seeded (consent records, ledger entries, a checkpoint) so that generated requests
reach the interesting code paths, and requests carry an officer key (the widest access);
a second pass sends a branch key, whose 403s must not hide server errors either.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error

from fedcrm.compliance import (
    Notice,
    open_store,
    sqlite_url,
)
from fedcrm.compliance.api import create_app
from fedcrm.compliance.api.deps import Services
from fedcrm.compliance.core.config import Settings
from fedcrm.compliance.lineage import LineageStore
from fedcrm.compliance.manifest import ManifestArchive
from support import ledger_entry

MAX_EXAMPLES = 5
"""Examples per endpoint and key; keeps the whole fuzz test well under a minute."""


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    url = sqlite_url(Path(tmp_path_factory.mktemp("fuzz")) / "fuzz.db")
    store = open_store(url)
    app = create_app(Settings(database_url=url), store=store)
    services: Services = app.state.services
    notice = Notice.from_text("n", "v1", "text")
    for subject in ("p_1", "p_2"):
        services.registry.give(
            branch="b1",
            subject=subject,
            purposes=["churn-model-training", "recommendation-training"],
            notice=notice,
            channel="web",
            actor="customer",
            at=datetime(2026, 1, 1, tzinfo=UTC),
        )
    services.ledger.append(
        ledger_entry(
            run_id="run-1",
            round=0,
            branch="b1",
            noise_multiplier=1.0,
            sampling_rate=0.1,
            steps=10,
            epsilon_budget=8.0,
        )
    )
    lineage = LineageStore(services.factory, audit=services.audit)
    archive = ManifestArchive(Path(tmp_path_factory.mktemp("fuzz-branch")))
    manifest = archive.commit(
        run_id="run-1",
        server_round=1,
        customers=["p_1", "p_2"],
        manifest_fields={
            "branch": "b1",
            "purpose": "churn-model-training",
            "snapshot_version": 1,
            "rows_before": 2,
            "rows_after": 2,
        },
        created_at=datetime(2026, 1, 2, tzinfo=UTC),
    )
    lineage.record_manifest(run_id="run-1", server_round=1, manifest=manifest)
    model = Path(tmp_path_factory.mktemp("fuzz-model")) / "model.safetensors"
    model.write_bytes(b"model")
    lineage.record_release(run_id="run-1", model="churn", path=model, last_round=1)
    services.audit.checkpoint(Ed25519PrivateKey.generate())
    app.state.fuzz_tokens = {
        "officer": services.keys.create("officer", label="fuzz")[1],
        "branch": services.keys.create("branch", label="fuzz", branch="b1")[1],
    }
    yield app
    store.kw["bind"].dispose()


def _operations(app: FastAPI) -> list[Any]:
    """Every operation of the app's schema (an invalid one raises here)."""
    results: list[Any] = list(
        schemathesis.openapi.from_asgi("/openapi.json", app).get_all_operations()
    )
    return [result.ok() for result in results]


def test_no_endpoint_answers_5xx(fuzz_app: FastAPI) -> None:
    """schemathesis' pytest integration (lazy schemas) does not run on pytest 9, so each
    operation's strategy is driven by Hypothesis here, with every API key."""
    tokens = list(fuzz_app.state.fuzz_tokens.values())
    operations = _operations(fuzz_app)
    paths = {operation.path for operation in operations}
    assert {"/consent/{branch}/import", "/audit/export", "/ropa", "/ledger/burn-down"} <= paths
    assert {"/lineage/runs", "/lineage/manifests", "/lineage/membership"} <= paths
    assert len(paths) >= 18
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: Any) -> None:
            for token in tokens:
                case.call_and_validate(headers={"X-API-Key": token}, checks=[not_a_server_error])

        fuzz()
