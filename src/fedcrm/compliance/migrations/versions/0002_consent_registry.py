"""Consent registry (records and append-only history) and hashed API keys.

Revision ID: 0002_consent_registry
Revises: 0001_initial
Create Date: 2026-11-22

``consent_events`` is append-only in the database itself: triggers refuse every UPDATE and
DELETE on SQLite and PostgreSQL (and TRUNCATE on PostgreSQL), so not even a buggy service can
rewrite a customer's history. ``consent_records`` rows are protected the same way. As in 0001,
the allowed values of enumerated columns are frozen here as CHECK constraints.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_consent_registry"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_REF = 128
_APPEND_ONLY_TABLES = ("consent_records", "consent_events")


def _one_of(table: str, column: str, values: Sequence[str]) -> sa.CheckConstraint:
    listed = ", ".join(f"'{value}'" for value in values)
    return sa.CheckConstraint(f"{column} IN ({listed})", name=f"ck_{table}_{column}")


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
            # Row triggers do not fire on TRUNCATE: refuse it with a statement trigger.
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
    """Create the consent and API-key tables and the append-only triggers."""
    op.create_table(
        "consent_records",
        sa.Column("record_id", sa.String(32), nullable=False),
        sa.Column("branch", sa.String(_REF), nullable=False),
        sa.Column("subject_ref", sa.String(_REF), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("record_id", name="pk_consent_records"),
        sa.UniqueConstraint("branch", "subject_ref", name="uq_consent_records_branch_subject"),
    )
    op.create_index("ix_consent_records_branch", "consent_records", ["branch"])
    op.create_index("ix_consent_records_subject_ref", "consent_records", ["subject_ref"])
    op.create_table(
        "consent_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("record_id", sa.String(32), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("legal_basis", sa.String(32), nullable=False),
        sa.Column("occurred_at", _utc(), nullable=False),
        sa.Column("expires_at", _utc(), nullable=True),
        sa.Column("actor", sa.String(_REF), nullable=False),
        sa.Column("channel", sa.String(32), nullable=False),
        sa.Column("collection_method", sa.String(32), nullable=False),
        sa.Column("notice_id", sa.String(_REF), nullable=False),
        sa.Column("notice_version", sa.String(64), nullable=False),
        sa.Column("notice_hash", sa.String(64), nullable=False),
        sa.Column("audit_index", sa.BigInteger(), nullable=False),
        sa.Column("recorded_at", _utc(), nullable=False),
        _one_of(
            "consent_events",
            "purpose",
            ["churn-model-training", "recommendation-training", "marketing-profiling"],
        ),
        _one_of("consent_events", "event", ["given", "refused", "withdrawn", "expired", "renewed"]),
        _one_of(
            "consent_events",
            "legal_basis",
            [
                "consent",
                "explicit-consent",
                "contract",
                "legal-obligation",
                "legitimate-interest",
            ],
        ),
        _one_of(
            "consent_events",
            "channel",
            ["web", "mobile-app", "in-branch", "phone", "email", "post", "api"],
        ),
        _one_of(
            "consent_events",
            "collection_method",
            ["online-form", "paper-form", "signed-document", "verbal-recorded", "branch-import"],
        ),
        sa.CheckConstraint(
            "expires_at IS NULL OR expires_at > occurred_at",
            name="ck_consent_events_expiry_after_event",
        ),
        sa.ForeignKeyConstraint(
            ["record_id"],
            ["consent_records.record_id"],
            name="fk_consent_events_record_id_consent_records",
        ),
        sa.ForeignKeyConstraint(
            ["audit_index"],
            ["audit_entries.seq"],
            name="fk_consent_events_audit_index_audit_entries",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_consent_events"),
    )
    op.create_index(
        "ix_consent_events_record_purpose",
        "consent_events",
        ["record_id", "purpose", "occurred_at"],
    )
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("token_hash", sa.LargeBinary(), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("branch", sa.String(_REF), nullable=True),
        sa.Column("label", sa.String(_REF), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("revoked_at", _utc(), nullable=True),
        _one_of("api_keys", "role", ["officer", "branch", "researcher"]),
        sa.CheckConstraint(
            "(role = 'branch' AND branch IS NOT NULL) OR (role <> 'branch' AND branch IS NULL)",
            name="ck_api_keys_branch_role_has_branch",
        ),
        sa.PrimaryKeyConstraint("key_id", name="pk_api_keys"),
    )
    _create_append_only_triggers()


def downgrade() -> None:
    """Drop the consent and API-key tables (this destroys consent evidence: operators only)."""
    _drop_append_only_triggers()
    op.drop_table("api_keys")
    op.drop_index("ix_consent_events_record_purpose", table_name="consent_events")
    op.drop_table("consent_events")
    op.drop_index("ix_consent_records_subject_ref", table_name="consent_records")
    op.drop_index("ix_consent_records_branch", table_name="consent_records")
    op.drop_table("consent_records")
