"""Fixtures of the compliance tests: stores on SQLite files and on PostgreSQL, keys, logs."""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from fedcrm.compliance import open_store, sqlite_url
from fedcrm.compliance.audit import AuditLog, generate_signing_key

# typer 0.20 imports a name click 8.5 deprecated; pytest runs with filterwarnings = error.
# Import it once here, with only that warning silenced, until pyproject ignores it.
with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message=r"'click\.utils\.\w+' is deprecated", category=DeprecationWarning
    )
    import typer  # noqa: F401

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_ADMIN_DSN = f"host={PG_HOST} port={PG_PORT} user=postgres dbname=test connect_timeout=5"


def _engine(factory: sessionmaker[Session]) -> Engine:
    bind = factory.kw["bind"]
    assert isinstance(bind, Engine)
    return bind


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """URL of a fresh SQLite file."""
    return sqlite_url(tmp_path / "compliance.db")


@pytest.fixture
def store(db_url: str) -> Iterator[sessionmaker[Session]]:
    """A migrated SQLite store."""
    factory = open_store(db_url)
    yield factory
    _engine(factory).dispose()


@pytest.fixture
def audit_log(store: sessionmaker[Session]) -> AuditLog:
    """An empty audit log on the SQLite store."""
    return AuditLog(store)


@pytest.fixture
def signing_key(tmp_path: Path) -> Ed25519PrivateKey:
    """A fresh Ed25519 log key, written to tmp_path/log-key.pem (and .pub)."""
    return generate_signing_key(tmp_path / "log-key.pem")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A uniquely named PostgreSQL database for this test session, dropped afterwards.

    Fails (never skips) when the server cannot be reached.
    """
    name = f"fedcrm_compliance_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True)
    except psycopg.OperationalError as exc:
        failure = str(exc).strip()
    else:
        failure = ""
    if failure:
        pytest.fail(
            f"PostgreSQL at {PG_HOST}:{PG_PORT} is unreachable (user postgres, database test): "
            f"{failure}. The compliance store must be tested on PostgreSQL; start the server.",
            pytrace=False,
        )
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[sessionmaker[Session]]:
    """A migrated store on the session's PostgreSQL database."""
    factory = open_store(postgres_url)
    yield factory
    _engine(factory).dispose()
