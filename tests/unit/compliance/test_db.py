"""The compliance store: migrations on a fresh SQLite file and on PostgreSQL, engines, sessions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from fedcrm.compliance import (
    CumulativeEpsilonDecrease,
    EventType,
    PrivacyLedger,
    StoreError,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    open_store,
    sqlite_url,
    transaction,
    upgrade,
)
from fedcrm.compliance.audit import AuditEvent, AuditLog
from fedcrm.compliance.models import Base, PrivacyLedgerEntry
from support import ledger_entry

TABLES = {
    "alembic_version",
    "audit_log_state",
    "audit_body_keys",
    "audit_entries",
    "audit_checkpoints",
    "privacy_ledger",
    "privacy_ledger_totals",
    "consent_records",
    "consent_events",
    "api_keys",
    "round_manifests",
    "model_releases",
    "customer_spends",
    "customer_privacy",
}


def assert_schema_matches_models(engine: Engine) -> None:
    assert set(inspect(engine).get_table_names()) == TABLES
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def exercise(factory: sessionmaker[Session], key: Ed25519PrivateKey) -> None:
    """Round-trip every table once: audit append, shredding, checkpoint, ledger."""
    log = AuditLog(factory)
    ledger = PrivacyLedger(factory, audit=log)
    log.append(AuditEvent(EventType.CONSENT_CHANGE, {"status": "given"}, "p_0001"))
    ledger.append(
        ledger_entry(
            run_id="r",
            round=0,
            branch="b",
            noise_multiplier=1.0,
            sampling_rate=0.1,
            steps=10,
            epsilon=0.3,
            cumulative_epsilon=0.3,
            epsilon_budget=None,
        )
    )
    log.shred_subject("p_0001", reason="erasure")
    signed = log.checkpoint(key)
    assert signed.tree_size == 3
    assert log.verify(trusted_keys={signed.public_key}).ok
    assert log.entries()[0].time.tzinfo is not None
    with pytest.raises(CumulativeEpsilonDecrease):
        ledger.append(dataclasses.replace(ledger.entries()[0], cumulative_epsilon=0.2))


def test_migrations_on_fresh_sqlite_file(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "nested" / "fresh.db")
    upgrade(url)
    engine = make_engine(url)
    try:
        assert current_revision(engine) == head_revision()
        assert_schema_matches_models(engine)
        upgrade(url)  # idempotent
        downgrade(url, "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
        upgrade(url)
        assert_schema_matches_models(engine)
    finally:
        engine.dispose()


def test_sqlite_store_round_trip(store: sessionmaker[Session]) -> None:
    exercise(store, Ed25519PrivateKey.generate())


def test_database_constraints_back_the_invariants(store: sessionmaker[Session]) -> None:
    row = PrivacyLedgerEntry(
        run_id="r",
        round=0,
        branch="b",
        model="m",
        purpose="p",
        privacy_unit="record",
        neighbouring_relation="add-remove",
        mechanism="gaussian",
        noise_multiplier=1.0,
        clipping_norm=1.0,
        sampling_rate=1.0,
        sampling_method="none",
        steps=1,
        delta=2.0,
        accountant="rdp",
        library_version="x",
        epsilon=1.0,
        cumulative_epsilon=1.0,
        decision="admitted",
    )
    with pytest.raises(IntegrityError, match="delta_range"), transaction(store) as session:
        session.add(row)
    with pytest.raises(IntegrityError), transaction(store) as session:
        session.execute(text("UPDATE audit_log_state SET id = 2"))


def test_open_store_refuses_unmigrated_and_bad_urls(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="revision None"):
        open_store(sqlite_url(tmp_path / "empty.db"), migrate=False)
    with pytest.raises(StoreError, match="unsupported database backend"):
        make_engine("mysql://localhost/db")
    with pytest.raises(StoreError, match="invalid database URL"):
        make_engine("not a url")
    with pytest.raises(StoreError, match="in-memory"):
        open_store("sqlite://")


def test_unreachable_postgres_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="migrating the compliance store failed"):
        upgrade("postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2")


@pytest.mark.postgres
def test_migrations_on_postgresql(postgres_url: str) -> None:
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    try:
        assert current_revision(engine) == head_revision()
        assert_schema_matches_models(engine)
        downgrade(postgres_url, "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
        upgrade(postgres_url)
        assert_schema_matches_models(engine)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgresql_store_round_trip(pg_store: sessionmaker[Session]) -> None:
    with transaction(pg_store) as session:
        for table in (
            "privacy_ledger_totals",
            "privacy_ledger",
            "audit_checkpoints",
            "audit_entries",
            "audit_body_keys",
        ):
            session.execute(text(f"DELETE FROM {table}"))
        session.execute(text("UPDATE audit_log_state SET tree_size = 0"))
    exercise(pg_store, Ed25519PrivateKey.generate())
