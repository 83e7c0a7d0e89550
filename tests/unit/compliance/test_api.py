"""The compliance service: authentication, roles, branches, consent, ledger, audit, RoPA."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from fedcrm.compliance import (
    ApiKeyStore,
    LedgerEntry,
    Notice,
)
from fedcrm.compliance.api import create_app
from fedcrm.compliance.api.deps import Services
from fedcrm.compliance.audit import verify_consistency, verify_inclusion
from fedcrm.compliance.core.config import (
    Controller,
    ProcessingActivity,
    RopaConfig,
    Settings,
    get_settings,
)
from support import ledger_entry

NOTICE = Notice.from_text("crm-privacy-notice", "2026-01", "notice text")
GIVE = {
    "purposes": [{"purpose": "churn-model-training"}],
    "notice": {"notice_id": NOTICE.notice_id, "version": NOTICE.version, "sha256": NOTICE.sha256},
    "channel": "web",
    "actor": "customer",
    "at": "2026-01-01T00:00:00Z",
}
WITHDRAW = {"channel": "web", "actor": "customer", "at": "2026-02-01T00:00:00Z"}


@dataclass
class Api:
    client: TestClient
    services: Services
    officer: dict[str, str]
    branch1: dict[str, str]
    branch2: dict[str, str]
    researcher: dict[str, str]


def _api(store: sessionmaker[Session], db_url: str) -> Api:
    app = create_app(Settings(database_url=db_url), store=store)
    services: Services = app.state.services
    keys = ApiKeyStore(store)

    def header(role: str, branch: str | None = None) -> dict[str, str]:
        return {"X-API-Key": keys.create(role, label=f"{role}-{branch}", branch=branch)[1]}

    return Api(
        TestClient(app),
        services,
        header("officer"),
        header("branch", "b1"),
        header("branch", "b2"),
        header("researcher"),
    )


@pytest.fixture
def api(store: sessionmaker[Session], db_url: str) -> Api:
    return _api(store, db_url)


def _ledger_entry(round_: int, cumulative: float, branch: str = "b1") -> LedgerEntry:
    return ledger_entry(
        round=round_,
        branch=branch,
        sampling_rate=0.05,
        steps=20,
        epsilon=0.5,
        cumulative_epsilon=cumulative,
        epsilon_budget=8.0,
    )


# -- authentication and authorisation -----------------------------------------------------

PER_CUSTOMER = [
    ("GET", "/consent/b1/customers/p_1"),
    ("GET", "/consent/b1/customers/p_1/status"),
    ("GET", "/consent/b1/customers/p_1/receipt"),
    ("GET", "/consent/b1/valid?purpose=churn-model-training"),
    ("POST", "/consent/b1/customers/p_1/give"),
    ("POST", "/consent/b1/customers/p_1/withdraw"),
    ("GET", "/ledger/entries"),
    ("GET", "/ledger/runs/run-1"),
    ("GET", "/ledger/customers/p_1"),
]
OFFICER_ONLY = [
    ("POST", "/consent/b1/customers/p_1/erase"),
    ("GET", "/audit/status"),
    ("GET", "/audit/checkpoints"),
    ("GET", "/audit/proofs/inclusion?index=0"),
    ("GET", "/audit/export"),
    ("GET", "/ropa"),
]
AGGREGATES = [("GET", "/consent/coverage"), ("GET", "/ledger/totals"), ("GET", "/ledger/burn-down")]
EVERY = PER_CUSTOMER + OFFICER_ONLY + AGGREGATES


def _call(api: Api, method: str, path: str, headers: dict[str, str]) -> int:
    body = GIVE if path.endswith("/give") else WITHDRAW
    if path.endswith("/erase"):
        body = {"reason": "request 1"}
    if method == "POST":
        return int(api.client.post(path, json=body, headers=headers).status_code)
    return int(api.client.get(path, headers=headers).status_code)


@pytest.mark.parametrize(("method", "path"), EVERY, ids=[p for _, p in EVERY])
def test_no_or_bad_key_is_401(api: Api, method: str, path: str) -> None:
    assert _call(api, method, path, {}) == 401
    assert _call(api, method, path, {"X-API-Key": "fcrm_0123456789abcdef_" + "x" * 43}) == 401
    assert _call(api, method, path, {"X-API-Key": "garbage"}) == 401
    response = api.client.get(path.split("?")[0], headers={})
    assert response.status_code in (401, 405)


def test_a_revoked_key_is_401(api: Api) -> None:
    keys = api.services.keys
    info, token = keys.create("officer", label="temp")
    assert api.client.get("/me", headers={"X-API-Key": token}).status_code == 200
    assert keys.revoke(info.key_id)
    assert api.client.get("/me", headers={"X-API-Key": token}).status_code == 401


@pytest.mark.parametrize(("method", "path"), PER_CUSTOMER, ids=[p for _, p in PER_CUSTOMER])
def test_researchers_see_no_per_customer_data(api: Api, method: str, path: str) -> None:
    assert _call(api, method, path, api.researcher) == 403


@pytest.mark.parametrize(("method", "path"), OFFICER_ONLY, ids=[p for _, p in OFFICER_ONLY])
def test_officer_only_routes_refuse_other_roles(api: Api, method: str, path: str) -> None:
    for headers in (api.branch1, api.researcher):
        assert _call(api, method, path, headers) == 403


def test_a_branch_key_is_refused_another_branch(api: Api) -> None:
    assert api.client.post(
        "/consent/b1/customers/p_1/give", json=GIVE, headers=api.branch1
    ).is_success
    for method, path in PER_CUSTOMER[:6]:
        assert _call(api, method, path, api.branch2) == 403, path
    assert api.client.get("/consent/coverage?branch=b1", headers=api.branch2).status_code == 403
    assert api.client.get("/ledger/totals?branch=b1", headers=api.branch2).status_code == 403
    assert api.client.get("/ledger/entries?branch=b1", headers=api.branch2).status_code == 403


def test_aggregates_are_scoped_to_a_branch_keys_branch(api: Api) -> None:
    registry, ledger = api.services.registry, api.services.ledger
    for branch in ("b1", "b2"):
        registry.give(
            branch=branch,
            subject="p_1",
            purposes=["churn-model-training"],
            notice=NOTICE,
            channel="web",
            actor="customer",
        )
        ledger.append(_ledger_entry(0, 0.5, branch))
    own = api.client.get("/consent/coverage", headers=api.branch2).json()
    assert {item["branch"] for item in own} == {"b2"}
    totals = api.client.get("/ledger/totals", headers=api.branch2).json()
    assert {item["branch"] for item in totals} == {"b2"}
    entries = api.client.get("/ledger/runs/run-1", headers=api.branch2).json()
    assert {item["branch"] for item in entries} == {"b2"}
    everyone = api.client.get("/consent/coverage", headers=api.researcher).json()
    assert {item["branch"] for item in everyone} == {"b1", "b2"}
    assert not any("customer" in key for item in everyone for key in item if key != "customers")


def test_me_reports_the_role(api: Api) -> None:
    assert api.client.get("/me", headers=api.branch1).json()["branch"] == "b1"
    assert api.client.get("/me", headers=api.researcher).json()["role"] == "researcher"


# -- consent flows ------------------------------------------------------------------------


def test_give_withdraw_and_the_gate(api: Api) -> None:
    client = api.client
    created = client.post("/consent/b1/customers/p_1/give", json=GIVE, headers=api.branch1)
    assert created.status_code == 201
    assert created.json()["purposes"][0]["valid"] is True
    assert client.post("/consent/b1/customers/p_2/give", json=GIVE, headers=api.officer).is_success
    gate = "/consent/b1/valid?purpose=churn-model-training&at=2026-01-15T00:00:00Z"
    assert client.get(gate, headers=api.branch1).json()["customer_ids"] == ["p_1", "p_2"]

    withdrawn = client.post(
        "/consent/b1/customers/p_1/withdraw", json=WITHDRAW, headers=api.branch1
    )
    assert withdrawn.status_code == 201
    after = "/consent/b1/valid?purpose=churn-model-training&at=2026-02-02T00:00:00Z"
    assert client.get(after, headers=api.officer).json()["customer_ids"] == ["p_2"]
    assert client.get(gate, headers=api.officer).json()["count"] == 2  # history kept

    record = client.get("/consent/b1/customers/p_1", headers=api.branch1).json()
    assert [h["event"] for h in record["history"]] == ["given", "withdrawn"]
    receipt = client.get("/consent/b1/customers/p_1/receipt", headers=api.branch1).json()
    assert receipt["purposes"][0]["status"] == "withdrawn"
    # Domain errors map to HTTP: nothing left to withdraw, unknown customer, bad input.
    again = client.post("/consent/b1/customers/p_1/withdraw", json=WITHDRAW, headers=api.branch1)
    assert again.status_code == 409
    assert client.get("/consent/b1/customers/p_9", headers=api.officer).status_code == 404
    bad = client.post(
        "/consent/b1/customers/p_3/give", json={**GIVE, "channel": "fax"}, headers=api.officer
    )
    assert bad.status_code == 422
    assert bad.json()["problems"]


def test_csv_import_over_http_is_all_or_nothing(api: Api) -> None:
    header = (
        "customer_id,purpose,status,legal_basis,occurred_at,notice_id,notice_version,"
        "notice_hash,channel\n"
    )
    good = f"p_1,churn-model-training,given,consent,2026-01-01T00:00:00Z,n,v1,{NOTICE.sha256},web\n"
    bad = "p_2,churn-model-training,given,consent,yesterday,n,v1,abc,web\n"
    csv_headers = {**api.branch1, "Content-Type": "text/csv"}
    refused = api.client.post(
        "/consent/b1/import", content=header + good + bad, headers=csv_headers
    )
    assert refused.status_code == 422
    assert [e["line"] for e in refused.json()["errors"]] == [3]
    assert api.client.get("/consent/b1/customers/p_1", headers=api.officer).status_code == 404
    accepted = api.client.post("/consent/b1/import", content=header + good, headers=csv_headers)
    assert accepted.status_code == 201
    assert accepted.json()["events"] == 1
    other = {**api.branch2, "Content-Type": "text/csv"}
    assert (
        api.client.post("/consent/b1/import", content=header + good, headers=other).status_code
        == 403
    )


# -- ledger, audit, records of processing -------------------------------------------------


def test_ledger_routes_and_burn_down(api: Api) -> None:
    for round_, cumulative in enumerate((0.5, 1.0, 1.6)):
        api.services.ledger.append(_ledger_entry(round_, cumulative))
    series = api.client.get("/ledger/burn-down", headers=api.researcher).json()
    assert len(series) == 1
    assert series[0]["budget"] == 8.0
    assert series[0]["spent"] == pytest.approx(1.6)
    assert [p["cumulative_epsilon"] for p in series[0]["points"]] == [0.5, 1.0, 1.6]
    entries = api.client.get("/ledger/entries?model=churn", headers=api.officer).json()
    assert [e["round"] for e in entries] == [0, 1, 2]
    assert api.client.get("/ledger/totals", headers=api.researcher).json()[0][
        "cumulative_epsilon"
    ] == pytest.approx(1.6)


def test_audit_proofs_verify_on_the_client(api: Api) -> None:
    for subject in ("p_1", "p_2", "p_3"):
        api.client.post(f"/consent/b1/customers/{subject}/give", json=GIVE, headers=api.officer)
    api.services.audit.checkpoint(Ed25519PrivateKey.generate())
    status = api.client.get("/audit/status", headers=api.officer).json()
    assert status["verified"] is True
    assert status["tree_size"] == 3
    assert status["latest_checkpoint"]["tree_size"] == 3
    proof = api.client.get("/audit/proofs/inclusion?index=1", headers=api.officer).json()
    verify_inclusion(
        bytes.fromhex(proof["leaf_hash"]),
        proof["leaf_index"],
        proof["tree_size"],
        [bytes.fromhex(node) for node in proof["inclusion_path"]],
        bytes.fromhex(status["latest_checkpoint"]["root_hash"]),
    )
    consistency = api.client.get(
        "/audit/proofs/consistency?first=1&second=3", headers=api.officer
    ).json()
    verify_consistency(
        1,
        3,
        bytes.fromhex(consistency["first_root_hash"]),
        bytes.fromhex(consistency["second_root_hash"]),
        [bytes.fromhex(node) for node in consistency["consistency_path"]],
    )
    missing = api.client.get("/audit/proofs/inclusion?index=99", headers=api.officer)
    assert missing.status_code == 404
    export = api.client.get("/audit/export", headers=api.officer)
    assert export.headers["content-type"].startswith("application/x-ndjson")
    assert b"p_1" in export.content  # pseudonymous subjects only; bodies are ciphertexts
    assert b"customer" not in export.content


def test_records_of_processing_come_from_the_configuration(api: Api, db_url: str) -> None:
    api.client.post("/consent/b7/customers/p_1/give", json=GIVE, headers=api.officer)
    ropa = api.client.get("/ropa", headers=api.officer).json()
    assert {r["purpose"] for r in ropa["records"]} == {
        "churn-model-training",
        "recommendation-training",
        "marketing-profiling",
    }
    assert "b7" in ropa["branches"]
    # No run configuration loaded: the records say so and claim no measure.
    assert ropa["source"]["kind"] == "none"
    assert ropa["security"]["measures"] == []
    assert ropa["security"]["ckks"] is None
    assert "no run configuration loaded" in ropa["security"]["not_in_force"][0]
    churn = next(r for r in ropa["records"] if r["purpose"] == "churn-model-training")
    assert churn["dp_targets"] == []
    assert churn["legal_basis"] is None
    # A configuration given as plain data, through a dependency override.
    custom = Settings(
        database_url=db_url,
        ropa=RopaConfig(
            controller=Controller(name="Acme Telco", contact="privacy@acme.test", dpo_contact="d"),
            activities=(
                ProcessingActivity(
                    purpose="churn-model-training",  # type: ignore[arg-type]
                    description="churn",
                    legal_basis="consent",  # type: ignore[arg-type]
                    data_subjects=("customers",),
                    data_categories=("usage",),
                    retention="1 year",
                ),
            ),
            branches=("north", "south"),
        ),
    )
    api.client.app.dependency_overrides[get_settings] = lambda: custom  # type: ignore[attr-defined]
    ropa = api.client.get("/ropa", headers=api.officer).json()
    assert ropa["controller"]["name"] == "Acme Telco"
    assert ropa["branches"] == ["b7", "north", "south"]
    assert len(ropa["records"]) == 1


def test_openapi_docs_are_served_and_leak_no_internal_field(api: Api) -> None:
    assert api.client.get("/docs").status_code == 200
    schema = api.client.get("/openapi.json").json()
    fields = {
        name
        for component in schema["components"]["schemas"].values()
        for name in component.get("properties", {})
    }
    assert fields  # the response models are documented
    internal = {"token_hash", "key_material", "subject_ref", "ciphertext", "nonce", "id_"}
    assert not fields & internal
    assert "APIKeyHeader" in schema["components"]["securitySchemes"]


@pytest.mark.postgres
def test_the_service_on_postgresql(fresh_pg_store: sessionmaker[Session]) -> None:
    url = fresh_pg_store.kw["bind"].url.render_as_string(hide_password=False)
    api = _api(fresh_pg_store, url)
    assert api.client.post(
        "/consent/b1/customers/p_1/give", json=GIVE, headers=api.branch1
    ).is_success
    assert api.client.post(
        "/consent/b1/customers/p_1/withdraw", json=WITHDRAW, headers=api.branch1
    ).is_success
    at = datetime(2026, 3, 1, tzinfo=UTC).isoformat()
    gate = api.client.get(
        "/consent/b1/valid",
        params={"purpose": "churn-model-training", "at": at},
        headers=api.branch1,
    )
    assert gate.json()["count"] == 0
    assert api.client.get("/consent/b1/customers/p_1", headers=api.branch2).status_code == 403
    assert api.client.get("/audit/status", headers=api.officer).json()["tree_size"] == 2


# -- officer pages ------------------------------------------------------------------------


def test_pages_need_an_officer_key_in_their_cookie(api: Api) -> None:
    client = api.client
    first = client.get("/pages/", follow_redirects=False)
    assert first.status_code == 303
    assert first.headers["location"].endswith("/pages/login")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    branch_token = api.branch1["X-API-Key"]
    assert (
        client.post("/pages/login", content=f"token={branch_token}", headers=form).status_code
        == 403
    )
    assert client.post("/pages/login", content="token=nope", headers=form).status_code == 401
    officer_token = api.officer["X-API-Key"]
    signed_in = client.post(
        "/pages/login", content=f"token={officer_token}", headers=form, follow_redirects=False
    )
    assert signed_in.status_code == 303
    cookie = signed_in.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Path=/pages" in cookie
    page = client.get("/pages/")
    assert page.status_code == 200
    assert 'id="burn-down"' in page.text
    assert client.get("/static/officer.js").status_code == 200
    # The cookie is for the read-only pages only: the JSON API still wants the header.
    client.cookies.set("fedcrm_officer_key", officer_token)
    assert client.get("/audit/status").status_code == 401


def test_pages_chart_numbers_come_from_the_ledger(api: Api) -> None:
    for round_, cumulative in enumerate((0.5, 1.0, 1.6)):
        api.services.ledger.append(_ledger_entry(round_, cumulative))
    api.client.cookies.set("fedcrm_officer_key", api.officer["X-API-Key"])
    html = api.client.get("/pages/").text
    for value in ("0.5", "1.0", "1.6"):
        assert f'data-epsilon="{value}"' in html
    assert 'data-budget="8.0"' in html


def test_oversized_bodies_are_refused_before_reading(
    store: sessionmaker[Session], db_url: str
) -> None:
    app = create_app(Settings(database_url=db_url, max_upload_bytes=1000), store=store)
    token = ApiKeyStore(store).create("officer", label="x")[1]
    client = TestClient(app)
    headers = {"X-API-Key": token, "Content-Type": "text/csv"}
    response = client.post("/consent/b1/import", content="x" * 1001, headers=headers)
    assert response.status_code == 413
    assert "exceeds 1000 bytes" in response.json()["detail"]

    def chunks() -> Iterator[bytes]:
        yield b"x" * 600
        yield b"x" * 600

    streamed = client.post("/consent/b1/import", content=chunks(), headers=headers)
    assert streamed.status_code == 413


def test_erasure_voids_consent_and_is_final(api: Api) -> None:
    api.client.post("/consent/b1/customers/p_1/give", json=GIVE, headers=api.branch1)
    erase = "/consent/b1/customers/p_1/erase"
    erased = api.client.post(erase, json={"reason": "request 7"}, headers=api.officer)
    assert erased.status_code == 200
    assert erased.json()["erased"] is True
    assert not any(p["valid"] for p in erased.json()["purposes"])
    gate = api.client.get("/consent/b1/valid?purpose=churn-model-training", headers=api.officer)
    assert gate.json()["customer_ids"] == []
    again = api.client.post(erase, json={"reason": "request 7"}, headers=api.officer)
    assert again.status_code == 410
    regive = api.client.post("/consent/b1/customers/p_1/give", json=GIVE, headers=api.officer)
    assert regive.status_code == 409


def test_a_customers_own_epsilon_per_branch_model_and_purpose(api: Api) -> None:
    from fedcrm.compliance import Accountant, CustomerLedger, PrivacyUnit, SpendCustomers

    customers = CustomerLedger(api.services.factory)
    for branch, spend, epsilons in (
        ("b1", "s1", {"p_1": 0.4, "p_2": 0.4}),
        ("b1", "s2", {"p_1": 0.7}),
        ("b2", "s3", {"p_1": 0.2}),
    ):
        customers.record(
            SpendCustomers(
                branch=branch,
                model="churn",
                purpose="churn-model-training",
                spend_id=spend,
                run_id="run-1",
                round=1,
                delta=1e-4,
                privacy_unit=PrivacyUnit.CUSTOMER,
                accountant=Accountant.RDP,
                epsilons=epsilons,
            )
        )
    everything = api.client.get("/ledger/customers/p_1", headers=api.officer).json()
    assert [(r["branch"], r["cumulative_epsilon"], r["spends"]) for r in everything] == [
        ("b1", 0.7, 2),
        ("b2", 0.2, 1),
    ]
    assert everything[0]["delta"] == 1e-4 and everything[0]["privacy_unit"] == "customer"
    own = api.client.get("/ledger/customers/p_1", headers=api.branch2).json()
    assert [r["branch"] for r in own] == ["b2"]
    assert api.client.get("/ledger/customers/p_9", headers=api.officer).json() == []
    with pytest.raises(Exception, match="lower"):  # a customer's ε is never lowered
        customers.record(
            SpendCustomers(
                branch="b1",
                model="churn",
                purpose="churn-model-training",
                spend_id="s4",
                run_id="run-1",
                round=2,
                delta=1e-4,
                privacy_unit=PrivacyUnit.CUSTOMER,
                accountant=Accountant.RDP,
                epsilons={"p_1": 0.5},
            )
        )
