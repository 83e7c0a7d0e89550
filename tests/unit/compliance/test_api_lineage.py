"""The ``/lineage`` routes: roles and branches, manifests, uses, membership checks."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from fedcrm.compliance import ApiKeyStore, Purpose
from fedcrm.compliance.api import create_app
from fedcrm.compliance.core.config import Settings
from fedcrm.compliance.lineage import LineageStore
from fedcrm.compliance.manifest import ManifestArchive, RoundManifest

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def lineage_api(
    any_store: sessionmaker[Session], tmp_path: Path
) -> tuple[TestClient, dict[str, dict[str, str]], ManifestArchive]:
    """Two branches' manifests for two rounds of run-1, a release after round 1, four keys."""
    archive = ManifestArchive(tmp_path / "b1-consent")
    store = LineageStore(any_store)
    fields = {"branch": "b1", "purpose": Purpose.CHURN_MODEL_TRAINING, "snapshot_version": 4}
    for rnd, customers in ((1, ["p_a", "p_b", "p_c"]), (2, ["p_a", "p_c"])):
        manifest = archive.commit(
            run_id="run-1",
            server_round=rnd,
            customers=customers,
            manifest_fields={
                **fields,
                "rows_before": 3,
                "rows_after": len(customers),
                "excluded": {"withdrawn": 3 - len(customers)} if len(customers) < 3 else {},
            },
            created_at=T0,
        )
        store.record_manifest(run_id="run-1", server_round=rnd, manifest=manifest)
        other = RoundManifest(**{**fields, "branch": "b2"}, root="c" * 64, leaves=5,  # type: ignore[arg-type]
                              rows_before=6, rows_after=5, excluded={"no-consent": 1})  # fmt: skip
        store.record_manifest(run_id="run-1", server_round=rnd, manifest=other)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"model")
    store.record_release(run_id="run-1", model="churn", path=model, last_round=1)
    url = str(any_store.kw["bind"].url.render_as_string(hide_password=False))
    app = create_app(Settings(database_url=url), store=any_store)
    keys = ApiKeyStore(any_store)
    headers = {
        "officer": {"X-API-Key": keys.create("officer", label="o")[1]},
        "b1": {"X-API-Key": keys.create("branch", label="b", branch="b1")[1]},
        "researcher": {"X-API-Key": keys.create("researcher", label="r")[1]},
    }
    return TestClient(app), headers, archive


def test_roles_and_branches(
    lineage_api: tuple[TestClient, dict[str, dict[str, str]], ManifestArchive],
) -> None:
    client, headers, _ = lineage_api
    assert client.get("/lineage/runs").status_code == 401
    (run,) = client.get("/lineage/runs", headers=headers["researcher"]).json()
    assert (run["rounds"], run["branches"], run["manifests"], run["models"]) == (2, 2, 4, 1)
    assert (run["rows_used"], run["rows_excluded"]) == (15, 3)
    assert client.get("/lineage/manifests", headers=headers["researcher"]).status_code == 403
    assert len(client.get("/lineage/manifests", headers=headers["officer"]).json()) == 4
    own = client.get("/lineage/manifests", headers=headers["b1"]).json()
    assert {m["branch"] for m in own} == {"b1"} and len(own) == 2
    assert "p_a" not in str(own)
    forbidden = client.get("/lineage/manifests?branch=b2", headers=headers["b1"])
    assert forbidden.status_code == 403
    assert client.get("/lineage/branches/b2/uses", headers=headers["b1"]).status_code == 403
    uses = client.get("/lineage/branches/b1/uses", headers=headers["b1"]).json()
    assert [(u["manifest"]["round"], len(u["models"])) for u in uses] == [(1, 1), (2, 0)]
    assert uses[1]["manifest"]["excluded"] == {"withdrawn": 1}


def test_membership_claims_are_checked_against_the_recorded_root(
    lineage_api: tuple[TestClient, dict[str, dict[str, str]], ManifestArchive],
) -> None:
    client, headers, archive = lineage_api
    first = archive.rounds("run-1")[0]
    proof = archive.membership("p_b", first)
    claim = {
        "run_id": "run-1",
        "round": 1,
        "branch": "b1",
        "customer_id": "p_b",
        "salt": archive.salts.load()["p_b"].hex(),
        "leaf_index": proof.leaf_index,
        "tree_size": proof.tree_size,
        "proof": list(proof.proof),
    }
    answer = client.post("/lineage/membership", json=claim, headers=headers["b1"]).json()
    assert answer["verified"] is True and answer["root"] == first.manifest.root
    wrong = client.post("/lineage/membership", json={**claim, "round": 2}, headers=headers["b1"])
    assert wrong.status_code == 200 and wrong.json()["verified"] is False
    other = {**claim, "customer_id": "p_a"}
    assert (
        client.post("/lineage/membership", json=other, headers=headers["officer"]).json()[
            "verified"
        ]
        is False
    )
    missing = client.post("/lineage/membership", json={**claim, "round": 9}, headers=headers["b1"])
    assert missing.status_code == 404
    assert (
        client.post("/lineage/membership", json=claim, headers=headers["researcher"]).status_code
        == 403
    )
    bad = client.post(
        "/lineage/membership", json={**claim, "salt": "zz"}, headers=headers["officer"]
    )
    assert bad.status_code == 422
