"""Fixtures of the compliance tests: stores on SQLite files and on PostgreSQL, keys, logs."""

from __future__ import annotations

import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from fedcrm.compliance import open_store, sqlite_url, upgrade
from fedcrm.compliance.audit import AuditLog, generate_signing_key

# typer 0.20 imports a name click 8.5 deprecated; pytest runs with filterwarnings = error.
# Import it once here, with only that warning silenced, until pyproject ignores it.
with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message=r"'click\.utils\.\w+' is deprecated", category=DeprecationWarning
    )
    import typer  # noqa: F401

# starlette 1.3's TestClient warns at import that it prefers httpx2 over httpx, and touches an
# alias anyio deprecated; neither is ours to fix. Same treatment: import once, those silenced.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"Using `httpx` with", category=Warning)
    warnings.filterwarnings(
        "ignore", message=r"The anyio\.abc\.\w+ alias is deprecated", category=DeprecationWarning
    )
    import fastapi.testclient  # noqa: F401

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_ADMIN_DSN = f"host={PG_HOST} port={PG_PORT} user=postgres dbname=test connect_timeout=5"


def _engine(factory: sessionmaker[Session]) -> Engine:
    bind = factory.kw["bind"]
    assert isinstance(bind, Engine)
    return bind


@pytest.fixture(scope="session")
def _migrated_sqlite_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to head once; each test gets a copy (migrating is the slow part)."""
    path = tmp_path_factory.mktemp("template") / "compliance.db"
    upgrade(sqlite_url(path))
    return path


@pytest.fixture
def db_url(tmp_path: Path, _migrated_sqlite_file: Path) -> str:
    """URL of a fresh SQLite file, already migrated to head."""
    path = tmp_path / "compliance.db"
    shutil.copyfile(_migrated_sqlite_file, path)
    return sqlite_url(path)


@pytest.fixture
def store(db_url: str) -> Iterator[sessionmaker[Session]]:
    """A migrated SQLite store (a fresh copy of the migrated file)."""
    factory = open_store(db_url, migrate=False)
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


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    """Connect to the server's ``test`` database; fail (never skip) when it is unreachable."""
    try:
        return psycopg.connect(PG_ADMIN_DSN, autocommit=True)
    except psycopg.OperationalError as exc:
        failure = str(exc).strip()
    pytest.fail(
        f"PostgreSQL at {PG_HOST}:{PG_PORT} is unreachable (user postgres, database test): "
        f"{failure}. The compliance store must be tested on PostgreSQL; start the server.",
        pytrace=False,
    )


def _pg_url(name: str) -> str:
    return f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/{name}"


def _postgres_database(template: str | None = None) -> Iterator[str]:
    """Create a uniquely named PostgreSQL database (optionally a copy of ``template``), yield
    its URL, drop it afterwards."""
    name = f"fedcrm_compliance_test_{uuid.uuid4().hex[:12]}"
    admin = _admin()
    try:
        suffix = f' TEMPLATE "{template}"' if template else ""
        admin.execute(f'CREATE DATABASE "{name}"{suffix}')
        yield _pg_url(name)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def migrated_pg_template() -> Iterator[str]:
    """Name of a PostgreSQL database migrated to head once, copied by :func:`fresh_pg_store`."""
    for url in _postgres_database():
        upgrade(url)
        yield url.rsplit("/", 1)[1]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A uniquely named PostgreSQL database for this test session, dropped afterwards."""
    yield from _postgres_database()


@pytest.fixture
def fresh_pg_store(migrated_pg_template: str) -> Iterator[sessionmaker[Session]]:
    """A migrated store on a PostgreSQL database of its own (consent history is append-only,
    so tests that write it cannot share one database and clean it up)."""
    for url in _postgres_database(template=migrated_pg_template):
        factory = open_store(url, migrate=False)
        yield factory
        _engine(factory).dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_store(request: pytest.FixtureRequest) -> Iterator[sessionmaker[Session]]:
    """A fresh migrated store on each backend: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        yield request.getfixturevalue("store")
    else:
        yield request.getfixturevalue("fresh_pg_store")


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[sessionmaker[Session]]:
    """A migrated store on the session's PostgreSQL database."""
    factory = open_store(postgres_url)
    yield factory
    _engine(factory).dispose()
