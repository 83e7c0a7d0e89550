"""Alembic environment of the compliance store (run by :func:`fedcrm.compliance.db.upgrade`).

No ``alembic.ini`` is needed: the configuration is built in code. When the caller passes an
open connection in ``config.attributes["connection"]`` the migrations run on it (inside the
caller's transaction); otherwise an engine is made from ``sqlalchemy.url``. Logging is left to
the application (no ``fileConfig`` here).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from fedcrm.compliance.db import make_engine
from fedcrm.compliance.models import Base

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit the migration SQL without a database (``alembic upgrade --sql``)."""
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the caller's connection, or on a new engine."""
    connection = context.config.attributes.get("connection")
    if isinstance(connection, Connection):
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("sqlalchemy.url is not set in the Alembic configuration")
    engine = make_engine(url)
    try:
        with engine.begin() as new_connection:
            _run(new_connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
