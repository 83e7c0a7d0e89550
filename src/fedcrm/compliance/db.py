"""Engine, sessions and migrations of the compliance store.

The store is a SQLite file by default (zero set-up) and PostgreSQL in production, chosen by URL:
``sqlite:///path/to/compliance.db`` or ``postgresql+psycopg://user@host:5432/dbname``. The
schema is created and upgraded only by the Alembic migrations shipped in this package
(``fedcrm/compliance/migrations``); :func:`upgrade` runs them without any ``alembic.ini``.

Notes:
    SQLite connections are opened with ``foreign_keys=ON`` and ``secure_delete=ON`` (a shredded
    key is overwritten on disk, not left in a free page), and every transaction starts with
    ``BEGIN IMMEDIATE`` so that writers are serialised and a read-then-write transaction (an
    audit append, a ledger append) never works on a stale snapshot. PostgreSQL gets the same
    guarantee from ``SELECT ... FOR UPDATE`` on the rows each append locks. After a
    crypto-shredding on PostgreSQL, run ``VACUUM`` so that dead row versions holding the old key
    are reclaimed; backups taken before the shredding still hold the key and must expire.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import URL, ColumnElement, Engine, create_engine, event, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import QueryableAttribute, Session, sessionmaker
from sqlalchemy.pool import StaticPool

from fedcrm.compliance.errors import StoreError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
"""Folder of the Alembic environment shipped inside the package."""

SQLITE_BUSY_TIMEOUT_S = 30.0
"""Seconds a SQLite connection waits for another writer before failing."""

CONFLICT_ATTEMPTS = 3
"""How many times :func:`retry_on_conflict` runs a write that keeps colliding."""

_T = TypeVar("_T")
_Record = TypeVar("_Record", bound="DataclassInstance")


def sqlite_url(path: str | Path) -> str:
    """Return the SQLAlchemy URL of a SQLite file (the default store).

    Args:
        path: The database file; created on first use, parent folders included by
            :func:`make_engine`.
    """
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def store_url(location: str) -> str:
    """Return ``location`` if it is a URL (has ``://``), else the URL of that SQLite file."""
    return location if "://" in location else sqlite_url(location)


def _is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _install_sqlite_pragmas(engine: Engine) -> None:
    """Serialise SQLite writers and enable foreign keys and secure delete (see module notes)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, emit BEGIN (SQLAlchemy docs, "Serializable
        # isolation / Savepoints / Transactional DDL" for pysqlite).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA secure_delete=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str | URL, *, echo: bool = False) -> Engine:
    """Create an engine for the compliance store.

    Args:
        url: SQLAlchemy URL, e.g. from :func:`sqlite_url` or ``postgresql+psycopg://...``.
        echo: Log every SQL statement (development only: statements can contain pseudonyms).

    Returns:
        The engine; SQLite engines carry the pragmas described in the module notes.

    Raises:
        StoreError: The URL is malformed or names an unsupported backend.
    """
    try:
        parsed = make_url(url)
    except (SQLAlchemyError, ValueError) as exc:
        raise StoreError(f"invalid database URL: {exc}") from exc
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise StoreError(
            f"unsupported database backend {backend!r}: use sqlite:///FILE or "
            "postgresql+psycopg://USER@HOST:PORT/DB"
        )
    kwargs: dict[str, Any] = {"echo": echo}
    if backend == "sqlite":
        if _is_memory_sqlite(parsed):
            # One shared connection, or every new connection would see an empty database.
            kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            Path(str(parsed.database)).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(parsed, **kwargs)
    if backend == "sqlite":
        _install_sqlite_pragmas(engine)
    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Return the session factory the repositories use (objects stay usable after commit)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Open a session in one transaction: committed on success, rolled back on any error."""
    with factory() as session, session.begin():
        yield session


def retry_on_conflict(write: Callable[[], _T], *, attempts: int = CONFLICT_ATTEMPTS) -> _T:
    """Run ``write`` (one whole transaction) again while it collides with a concurrent writer.

    The repositories lock the rows they read before writing, so the only collision left is two
    writers inserting the *first* row of the same key (a customer's consent record, a ledger
    total): one of them gets :class:`~sqlalchemy.exc.IntegrityError`, its transaction was
    rolled back, and running it again sees the other's row.

    Raises:
        IntegrityError: The last attempt collided too.
    """
    for _ in range(attempts - 1):
        try:
            return write()
        except IntegrityError:
            continue
    return write()


def record_from_row(cls: type[_Record], row: object) -> _Record:
    """Return the dataclass ``cls`` built from the same-named attributes of a stored row."""
    return cls(**{item.name: getattr(row, item.name) for item in dataclasses.fields(cls)})


def equalities(
    *pairs: tuple[QueryableAttribute[Any], object | None],
) -> list[ColumnElement[bool]]:
    """Return ``column == value`` for every pair whose value is given (not None).

    For optional query filters: ``select(Row).where(*equalities((Row.branch, branch), ...))``.
    """
    return [column == value for column, value in pairs if value is not None]


def _alembic_config(url: str | URL) -> Config:
    """Build the Alembic configuration in code (no ``alembic.ini`` at run time)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    rendered = url if isinstance(url, str) else url.render_as_string(hide_password=False)
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return cfg


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Create or upgrade the compliance schema by running the shipped Alembic migrations.

    Args:
        url: Database URL (see :func:`make_engine`).
        revision: Target revision; ``"head"`` is the latest.

    Raises:
        StoreError: The database cannot be reached or a migration failed; nothing of the failed
            migration is left behind (each migration runs in one transaction).
    """
    _migrate(url, command.upgrade, revision, doing="migrating")
    logger.info("compliance store migrated to %s", revision)


def downgrade(url: str | URL, revision: str) -> None:
    """Downgrade the compliance schema to ``revision`` (``"base"`` drops every table).

    Raises:
        StoreError: The database cannot be reached or a migration failed.
    """
    _migrate(url, command.downgrade, revision, doing="downgrading")


def _migrate(
    url: str | URL, step: Callable[[Config, str], None], revision: str, *, doing: str
) -> None:
    """Run one Alembic command to ``revision`` in one transaction, then dispose of the engine."""
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            cfg = _alembic_config(url)
            cfg.attributes["connection"] = connection
            step(cfg, revision)
    except SQLAlchemyError as exc:
        raise StoreError(f"{doing} the compliance store failed: {exc}") from exc
    finally:
        engine.dispose()


def head_revision() -> str:
    """Return the newest migration revision shipped with this package."""
    script = ScriptDirectory.from_config(_alembic_config("sqlite://"))
    head = script.get_current_head()
    if head is None:  # pragma: no cover - the package always ships migrations
        raise StoreError("no Alembic migrations found in the package")
    return head


def current_revision(engine: Engine) -> str | None:
    """Return the schema revision of a database (``None`` if it was never migrated)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def open_store(url: str | URL, *, migrate: bool = True) -> sessionmaker[Session]:
    """Open the compliance store: migrate it to head (by default) and return a session factory.

    Args:
        url: Database URL (see :func:`make_engine`).
        migrate: Run :func:`upgrade` first. Without it, a store that is not at the head
            revision is refused.

    Raises:
        StoreError: The store cannot be reached, migrated, or is at another revision.
    """
    if migrate:
        parsed = make_url(url) if isinstance(url, str) else url
        if _is_memory_sqlite(parsed):
            raise StoreError(
                "an in-memory SQLite store cannot be migrated and reopened; use a file"
            )
        upgrade(url)
    engine = make_engine(url)
    try:
        revision = current_revision(engine)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot open the compliance store: {exc}") from exc
    if revision != head_revision():
        raise StoreError(
            f"the compliance store is at revision {revision!r}, this fedcrm needs "
            f"{head_revision()!r}: run the migrations (fedcrm.compliance.db.upgrade)"
        )
    return make_session_factory(engine)
