"""The per-customer ledger: which DP-SGD spends included each customer, and their ε.

Revision ID: 0005_customer_ledger
Revises: 0004_ledger_spends
Create Date: 2026-12-04

``customer_spends`` holds one row per (branch, customer, model, purpose, spend): written by the
branch before it trains, append-only (database triggers refuse UPDATE and DELETE).
``customer_privacy`` holds each customer's cumulative ε for (branch, model, purpose), composed
over the spends that included them (individual accounting); it is never lowered.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_customer_ledger"
down_revision: str | None = "0004_ledger_spends"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_REF = 128


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
    if dialect == "sqlite":
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER customer_spends_no_{action.lower()} BEFORE {action} ON "
                "customer_spends BEGIN SELECT RAISE(ABORT, 'customer_spends is append-only'); END"
            )
    elif dialect == "postgresql":
        op.execute(
            "CREATE FUNCTION customer_spends_append_only() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'customer_spends is append-only'; END $$"
        )
        op.execute(
            "CREATE TRIGGER customer_spends_append_only BEFORE UPDATE OR DELETE ON "
            "customer_spends FOR EACH ROW EXECUTE FUNCTION customer_spends_append_only()"
        )


def downgrade() -> None:
    """Drop both tables (the per-customer evidence is lost: operators only)."""
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for action in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS customer_spends_no_{action}")
    elif dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS customer_spends_append_only ON customer_spends")
        op.execute("DROP FUNCTION IF EXISTS customer_spends_append_only()")
    op.drop_table("customer_privacy")
    op.drop_index("ix_customer_spends_scope", table_name="customer_spends")
    op.drop_index("ix_customer_spends_customer", table_name="customer_spends")
    op.drop_table("customer_spends")
