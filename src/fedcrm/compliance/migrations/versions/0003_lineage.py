"""Lineage: round manifests and model releases of federated runs.

Revision ID: 0003_lineage
Revises: 0002_consent_registry
Create Date: 2026-11-22

``round_manifests`` holds, per (run, round, branch), the public part of the branch's round
manifest (Merkle root over salted commitments of the customers used, consent-snapshot version,
counts) with the audit-log index of its ``round-manifest`` event; ``model_releases`` the hash of
every released model with the last round it includes. Both are append-only (database triggers
refuse UPDATE and DELETE, as for the consent history in 0002).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_lineage"
down_revision: str | None = "0002_consent_registry"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_REF = 128
_APPEND_ONLY_TABLES = ("round_manifests", "model_releases")


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _create_append_only_triggers() -> None:
    dialect = op.get_bind().dialect.name
    for table in _APPEND_ONLY_TABLES:
        if dialect == "sqlite":
            for action in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                )
        elif dialect == "postgresql":
            op.execute(
                f"CREATE FUNCTION {table}_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN RAISE EXCEPTION '{table} is append-only'; END $$"
            )
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION {table}_append_only()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                f"FOR EACH STATEMENT EXECUTE FUNCTION {table}_append_only()"
            )


def _drop_append_only_triggers() -> None:
    dialect = op.get_bind().dialect.name
    for table in _APPEND_ONLY_TABLES:
        if dialect == "sqlite":
            for action in ("update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{action}")
        elif dialect == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
            op.execute(f"DROP FUNCTION IF EXISTS {table}_append_only()")


def upgrade() -> None:
    """Create the lineage tables and their append-only triggers."""
    op.create_table(
        "round_manifests",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(_REF), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("branch", sa.String(_REF), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("root", sa.String(64), nullable=False),
        sa.Column("leaves", sa.Integer(), nullable=False),
        sa.Column("snapshot_version", sa.BigInteger(), nullable=False),
        sa.Column("rows_before", sa.Integer(), nullable=False),
        sa.Column("rows_after", sa.Integer(), nullable=False),
        sa.Column("excluded", sa.Text(), nullable=False),
        sa.Column("audit_index", sa.BigInteger(), nullable=False),
        sa.Column("recorded_at", _utc(), nullable=False),
        sa.CheckConstraint(
            "purpose IN ('churn-model-training', 'recommendation-training', 'marketing-profiling')",
            name="ck_round_manifests_purpose",
        ),
        sa.CheckConstraint("round >= 0", name="ck_round_manifests_round_non_negative"),
        sa.CheckConstraint(
            "rows_after >= 0 AND rows_after <= rows_before AND leaves = rows_after",
            name="ck_round_manifests_counts",
        ),
        sa.ForeignKeyConstraint(
            ["audit_index"],
            ["audit_entries.seq"],
            name="fk_round_manifests_audit_index_audit_entries",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_round_manifests"),
        sa.UniqueConstraint("run_id", "round", "branch", name="uq_round_manifests_run_round"),
    )
    op.create_index("ix_round_manifests_branch", "round_manifests", ["branch"])
    op.create_index("ix_round_manifests_run_id", "round_manifests", ["run_id"])
    op.create_table(
        "model_releases",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(_REF), nullable=False),
        sa.Column("model", sa.String(_REF), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("last_round", sa.Integer(), nullable=False),
        sa.Column("file_name", sa.String(255), nullable=False),
        sa.Column("audit_index", sa.BigInteger(), nullable=False),
        sa.Column("recorded_at", _utc(), nullable=False),
        sa.CheckConstraint("last_round >= 0", name="ck_model_releases_last_round_non_negative"),
        sa.ForeignKeyConstraint(
            ["audit_index"],
            ["audit_entries.seq"],
            name="fk_model_releases_audit_index_audit_entries",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_model_releases"),
    )
    op.create_index("ix_model_releases_run_id", "model_releases", ["run_id"])
    _create_append_only_triggers()


def downgrade() -> None:
    """Drop the lineage tables (this destroys lineage evidence: operators only)."""
    _drop_append_only_triggers()
    op.drop_index("ix_model_releases_run_id", table_name="model_releases")
    op.drop_table("model_releases")
    op.drop_index("ix_round_manifests_run_id", table_name="round_manifests")
    op.drop_index("ix_round_manifests_branch", table_name="round_manifests")
    op.drop_table("round_manifests")
