"""The per-customer ledger: which DP-SGD spends included each customer, and their ε.

Revision ID: 0005_customer_ledger
Revises: 0004_ledger_spends
Create Date: 2026-12-04

``customer_spends`` holds one row per (branch, customer, model, purpose, spend): written by the
branch before it trains, never updated. ``customer_privacy`` holds each customer's cumulative ε
for (branch, model, purpose), composed over the spends that included them (individual
accounting). Database triggers make the budgets' history tamper-resistant for every writer,
not only for the repositories: ``privacy_ledger`` rows are never updated or deleted, and no
UPDATE lowers a cumulative ε in ``privacy_ledger_totals`` or ``customer_privacy`` (nor deletes
a ledger total). (A customer's rows may still be deleted: an erasure request may need to.)
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_customer_ledger"
down_revision: str | None = "0004_ledger_spends"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_REF = 128

_GUARDS = {
    # trigger name: (table, event, SQLite WHEN condition / PostgreSQL IF condition, message)
    "privacy_ledger_no_update": ("privacy_ledger", "UPDATE", None, "the ledger is append-only"),
    "privacy_ledger_no_delete": ("privacy_ledger", "DELETE", None, "the ledger is append-only"),
    "privacy_totals_no_delete": (
        "privacy_ledger_totals",
        "DELETE",
        None,
        "a cumulative epsilon is never deleted",
    ),
    "privacy_totals_no_decrease": (
        "privacy_ledger_totals",
        "UPDATE",
        "NEW.cumulative_epsilon < OLD.cumulative_epsilon",
        "a cumulative epsilon never decreases",
    ),
    "customer_spends_no_update": (
        "customer_spends",
        "UPDATE",
        None,
        "customer_spends is append-only",
    ),
    "customer_privacy_no_decrease": (
        "customer_privacy",
        "UPDATE",
        "NEW.cumulative_epsilon < OLD.cumulative_epsilon",
        "a customer epsilon never decreases",
    ),
}


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _one_of(table: str, column: str, values: Sequence[str]) -> sa.CheckConstraint:
    listed = ", ".join(f"'{value}'" for value in values)
    return sa.CheckConstraint(f"{column} IN ({listed})", name=f"ck_{table}_{column}")


def upgrade() -> None:
    """Create both tables and make ``customer_spends`` append-only."""
    op.create_table(
        "customer_spends",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("branch", sa.String(_REF), nullable=False),
        sa.Column("customer", sa.String(_REF), nullable=False),
        sa.Column("model", sa.String(_REF), nullable=False),
        sa.Column("purpose", sa.String(64), nullable=False),
        sa.Column("spend_id", sa.String(64), nullable=False),
        sa.Column("run_id", sa.String(_REF), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("recorded_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_customer_spends"),
        sa.UniqueConstraint(
            "branch", "customer", "model", "purpose", "spend_id", name="uq_customer_spends"
        ),
    )
    op.create_index("ix_customer_spends_customer", "customer_spends", ["customer"])
    op.create_index("ix_customer_spends_scope", "customer_spends", ["branch", "model", "purpose"])
    op.create_table(
        "customer_privacy",
        sa.Column("branch", sa.String(_REF), nullable=False),
        sa.Column("customer", sa.String(_REF), nullable=False),
        sa.Column("model", sa.String(_REF), nullable=False),
        sa.Column("purpose", sa.String(64), nullable=False),
        sa.Column("cumulative_epsilon", sa.Double(), nullable=False),
        sa.Column("delta", sa.Double(), nullable=False),
        sa.Column("privacy_unit", sa.String(32), nullable=False),
        sa.Column("accountant", sa.String(32), nullable=False),
        sa.Column("spends", sa.Integer(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        _one_of("customer_privacy", "privacy_unit", ["record", "customer", "branch"]),
        _one_of("customer_privacy", "accountant", ["rdp", "prv", "gdp", "pld"]),
        sa.CheckConstraint(
            "cumulative_epsilon >= 0", name="ck_customer_privacy_customer_epsilon_non_negative"
        ),
        sa.CheckConstraint(
            "delta > 0 AND delta < 1", name="ck_customer_privacy_customer_delta_range"
        ),
        sa.PrimaryKeyConstraint(
            "branch", "customer", "model", "purpose", name="pk_customer_privacy"
        ),
    )
    dialect = op.get_bind().dialect.name
    for name, (table, event, condition, message) in _GUARDS.items():
        if dialect == "sqlite":
            when = f" WHEN {condition}" if condition else ""
            op.execute(
                f"CREATE TRIGGER {name} BEFORE {event} ON {table}{when} "
                f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
            )
        elif dialect == "postgresql":
            body = f"RAISE EXCEPTION '{message}';"
            if condition:
                body = f"IF {condition} THEN {body} END IF;"
            result = "OLD" if event == "DELETE" else "NEW"
            op.execute(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS "
                f"$$ BEGIN {body} RETURN {result}; END $$"
            )
            op.execute(
                f"CREATE TRIGGER {name} BEFORE {event} ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION {name}()"
            )


def downgrade() -> None:
    """Drop both tables (the per-customer evidence is lost: operators only)."""
    dialect = op.get_bind().dialect.name
    for name, (table, _event, _condition, _message) in _GUARDS.items():
        if dialect == "sqlite":
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        elif dialect == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
            op.execute(f"DROP FUNCTION IF EXISTS {name}()")
    op.drop_table("customer_privacy")
    op.drop_index("ix_customer_spends_scope", table_name="customer_spends")
    op.drop_index("ix_customer_spends_customer", table_name="customer_spends")
    op.drop_table("customer_spends")
