"""No writer lowers a cumulative ε: not the repositories, not raw SQL, not an API route.

The database itself refuses it (triggers of migration 0005) on SQLite and PostgreSQL; then
every route of the compliance service is called with the officer's key and the totals are
checked to be where they were.
"""

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from fedcrm.compliance import (
    Accountant,
    ApiKeyStore,
    CustomerLedger,
    PrivacyLedger,
    PrivacyUnit,
    SpendCustomers,
)
from fedcrm.compliance.api import create_app
from fedcrm.compliance.core.config import Settings
from fedcrm.compliance.db import transaction
from support import ledger_entry


def _fill(store: sessionmaker[Session]) -> None:
    ledger = PrivacyLedger(store)
    for rnd, cumulative in ((1, 0.5), (2, 0.9)):
        ledger.append(ledger_entry(round=rnd, branch="b1", cumulative_epsilon=cumulative))
    CustomerLedger(store).record(
        SpendCustomers(
            branch="b1",
            model="churn",
            purpose="churn-model-training",
            spend_id="s1",
            run_id="run-1",
            round=1,
            delta=1e-4,
            privacy_unit=PrivacyUnit.CUSTOMER,
            accountant=Accountant.RDP,
            epsilons={"p_1": 0.5},
        )
    )


def _totals(store: sessionmaker[Session]) -> tuple[list[float], list[float], int]:
    ledger = PrivacyLedger(store)
    return (
        [t.cumulative_epsilon for t in ledger.totals()],
        [t.cumulative_epsilon for t in CustomerLedger(store).customer("p_1")],
        len(ledger.entries()),
    )


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE privacy_ledger_totals SET cumulative_epsilon = 0.1",
        "DELETE FROM privacy_ledger_totals",
        "UPDATE privacy_ledger SET cumulative_epsilon = 0.1",
        "DELETE FROM privacy_ledger",
        "UPDATE customer_privacy SET cumulative_epsilon = 0.0",
        "UPDATE customer_spends SET spend_id = 'other'",
    ],
)
def test_the_database_refuses_to_lower_or_erase_a_budget(
    any_store: sessionmaker[Session], statement: str
) -> None:
    _fill(any_store)
    before = _totals(any_store)
    with (
        pytest.raises(DBAPIError, match=r"never|append-only"),
        transaction(any_store) as session,
    ):
        session.execute(text(statement))
    assert _totals(any_store) == before


def test_raising_a_total_is_still_allowed(any_store: sessionmaker[Session]) -> None:
    _fill(any_store)
    with transaction(any_store) as session:
        session.execute(text("UPDATE privacy_ledger_totals SET cumulative_epsilon = 2.0"))
    assert _totals(any_store)[0] == [2.0]


def _path(template: str) -> str:
    values = {"branch": "b1", "customer_id": "p_1", "run_id": "run-1", "model": "churn"}
    return re.sub(r"\{([^}:]+)(:[^}]*)?\}", lambda m: values.get(m.group(1), "x1"), template)


def test_no_route_of_the_service_lowers_a_cumulative_epsilon(
    store: sessionmaker[Session], db_url: str
) -> None:
    _fill(store)
    before = _totals(store)
    app = create_app(Settings(database_url=db_url), store=store)
    officer = {"X-API-Key": ApiKeyStore(store).create("officer", label="officer")[1]}
    client = TestClient(app, raise_server_exceptions=False)
    called = 0
    for template, operations in app.openapi()["paths"].items():  # every documented route
        for method in operations:
            for body in (None, {}, {"cumulative_epsilon": 0, "epsilon": 0, "branch": "b1"}):
                client.request(method.upper(), _path(template), headers=officer, json=body)
                called += 1
    assert called > 60
    assert _totals(store) == before


def test_no_ledger_command_lowers_a_cumulative_epsilon(tmp_path: Path, db_url: str) -> None:
    from fedcrm.cli import app
    from fedcrm.compliance import open_store

    store = open_store(db_url, migrate=False)
    _fill(store)
    before = _totals(store)
    db = db_url.removeprefix("sqlite:///")
    runner = CliRunner()
    for args in (
        ["ledger", "show", "--db", db],
        ["ledger", "show", "--db", db, "--customer", "p_1"],
        ["ledger", "recompute", "--db", db],
        ["compliance", "lineage", "--db", db, "--help"],
    ):
        runner.invoke(app, args)
    assert _totals(store) == before
