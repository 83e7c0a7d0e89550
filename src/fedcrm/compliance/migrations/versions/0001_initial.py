"""Initial compliance schema: audit log, body keys, checkpoints, privacy ledger.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-22

The allowed values of every enumerated column are frozen here as CHECK constraints (migrations
never import the live enums: a later change to an enum needs its own migration).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_REF = 128


def _one_of(table: str, column: str, values: Sequence[str]) -> sa.CheckConstraint:
    listed = ", ".join(f"'{value}'" for value in values)
    return sa.CheckConstraint(f"{column} IN ({listed})", name=f"ck_{table}_{column}")


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the tables of the compliance store."""
    op.create_table(
        "audit_log_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("tree_size", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_audit_log_state_single_row"),
        sa.CheckConstraint("tree_size >= 0", name="ck_audit_log_state_tree_size_non_negative"),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log_state"),
    )
    op.bulk_insert(
        sa.table("audit_log_state", sa.column("id", sa.Integer), sa.column("tree_size")),
        [{"id": 1, "tree_size": 0}],
    )
    op.create_table(
        "audit_body_keys",
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("scope", sa.String(32), nullable=False),
        sa.Column("subject_ref", sa.String(_REF), nullable=True),
        sa.Column("key_material", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("shredded_at", _utc(), nullable=True),
        _one_of("audit_body_keys", "scope", ["subject", "log"]),
        sa.CheckConstraint(
            "(scope = 'log' AND subject_ref IS NULL) OR "
            "(scope = 'subject' AND subject_ref IS NOT NULL)",
            name="ck_audit_body_keys_scope_subject",
        ),
        sa.CheckConstraint(
            "(shredded_at IS NULL AND key_material IS NOT NULL) OR "
            "(shredded_at IS NOT NULL AND key_material IS NULL)",
            name="ck_audit_body_keys_shredded_has_no_key",
        ),
        sa.PrimaryKeyConstraint("key_id", name="pk_audit_body_keys"),
        sa.UniqueConstraint("subject_ref", name="uq_audit_body_keys_subject_ref"),
    )
    op.create_table(
        "audit_entries",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("subject_ref", sa.String(_REF), nullable=True),
        sa.Column("time", _utc(), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("algorithm", sa.String(32), nullable=False),
        sa.Column("nonce", sa.LargeBinary(), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary(), nullable=False),
        _one_of(
            "audit_entries",
            "event_type",
            [
                "consent-change",
                "round-manifest",
                "ledger-entry",
                "refusal",
                "key-generation",
                "key-destruction",
                "model-release",
                "configuration-change",
            ],
        ),
        sa.CheckConstraint("seq >= 0", name="ck_audit_entries_seq_non_negative"),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["audit_body_keys.key_id"],
            name="fk_audit_entries_key_id_audit_body_keys",
        ),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_entries"),
    )
    op.create_index("ix_audit_entries_subject_ref", "audit_entries", ["subject_ref"])
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tree_size", sa.BigInteger(), nullable=False),
        sa.Column("root_hash", sa.LargeBinary(), nullable=False),
        sa.Column("timestamp_ms", sa.BigInteger(), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.CheckConstraint("tree_size >= 0", name="ck_audit_checkpoints_tree_size_non_negative"),
        sa.PrimaryKeyConstraint("id", name="pk_audit_checkpoints"),
    )
    op.create_index("ix_audit_checkpoints_tree_size", "audit_checkpoints", ["tree_size"])
    op.create_table(
        "privacy_ledger",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(_REF), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("branch", sa.String(_REF), nullable=False),
        sa.Column("model", sa.String(_REF), nullable=False),
        sa.Column("purpose", sa.String(64), nullable=False),
        sa.Column("privacy_unit", sa.String(32), nullable=False),
        sa.Column("neighbouring_relation", sa.String(32), nullable=False),
        sa.Column("mechanism", sa.String(32), nullable=False),
        sa.Column("noise_multiplier", sa.Double(), nullable=False),
        sa.Column("clipping_norm", sa.Double(), nullable=False),
        sa.Column("sampling_rate", sa.Double(), nullable=False),
        sa.Column("sampling_method", sa.String(32), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("delta", sa.Double(), nullable=False),
        sa.Column("accountant", sa.String(32), nullable=False),
        sa.Column("library_version", sa.String(_REF), nullable=False),
        sa.Column("epsilon", sa.Double(), nullable=False),
        sa.Column("cumulative_epsilon", sa.Double(), nullable=False),
        sa.Column("epsilon_budget", sa.Double(), nullable=True),
        sa.Column("decision", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("recorded_at", _utc(), nullable=False),
        _one_of("privacy_ledger", "privacy_unit", ["record", "customer", "branch"]),
        _one_of("privacy_ledger", "neighbouring_relation", ["add-remove", "replace-one"]),
        _one_of("privacy_ledger", "mechanism", ["subsampled-gaussian", "gaussian", "laplace"]),
        _one_of("privacy_ledger", "sampling_method", ["poisson", "fixed-size", "shuffle", "none"]),
        _one_of("privacy_ledger", "accountant", ["rdp", "prv", "gdp", "pld"]),
        _one_of("privacy_ledger", "decision", ["admitted", "refused"]),
        sa.CheckConstraint("round >= 0", name="ck_privacy_ledger_round_non_negative"),
        sa.CheckConstraint(
            "noise_multiplier >= 0", name="ck_privacy_ledger_noise_multiplier_non_negative"
        ),
        sa.CheckConstraint("clipping_norm > 0", name="ck_privacy_ledger_clipping_norm_positive"),
        sa.CheckConstraint(
            "sampling_rate > 0 AND sampling_rate <= 1",
            name="ck_privacy_ledger_sampling_rate_range",
        ),
        sa.CheckConstraint("steps >= 0", name="ck_privacy_ledger_steps_non_negative"),
        sa.CheckConstraint("delta > 0 AND delta < 1", name="ck_privacy_ledger_delta_range"),
        sa.CheckConstraint("epsilon >= 0", name="ck_privacy_ledger_epsilon_non_negative"),
        sa.CheckConstraint(
            "cumulative_epsilon >= 0", name="ck_privacy_ledger_cumulative_epsilon_non_negative"
        ),
        sa.CheckConstraint(
            "epsilon_budget IS NULL OR epsilon_budget > 0",
            name="ck_privacy_ledger_epsilon_budget_positive",
        ),
        sa.CheckConstraint(
            "decision = 'admitted' OR (reason IS NOT NULL AND reason <> '')",
            name="ck_privacy_ledger_refusal_has_reason",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_privacy_ledger"),
    )
    op.create_index("ix_privacy_ledger_run_id", "privacy_ledger", ["run_id"])
    op.create_index("ix_privacy_ledger_scope", "privacy_ledger", ["branch", "model", "purpose"])
    op.create_table(
        "privacy_ledger_totals",
        sa.Column("branch", sa.String(_REF), nullable=False),
        sa.Column("model", sa.String(_REF), nullable=False),
        sa.Column("purpose", sa.String(64), nullable=False),
        sa.Column("cumulative_epsilon", sa.Double(), nullable=False),
        sa.Column("last_entry_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.CheckConstraint(
            "cumulative_epsilon >= 0",
            name="ck_privacy_ledger_totals_cumulative_epsilon_non_negative",
        ),
        sa.ForeignKeyConstraint(
            ["last_entry_id"],
            ["privacy_ledger.id"],
            name="fk_privacy_ledger_totals_last_entry_id_privacy_ledger",
        ),
        sa.PrimaryKeyConstraint("branch", "model", "purpose", name="pk_privacy_ledger_totals"),
    )


def downgrade() -> None:
    """Drop every table of the compliance store (this destroys the evidence: operators only)."""
    op.drop_table("privacy_ledger_totals")
    op.drop_index("ix_privacy_ledger_scope", table_name="privacy_ledger")
    op.drop_index("ix_privacy_ledger_run_id", table_name="privacy_ledger")
    op.drop_table("privacy_ledger")
    op.drop_index("ix_audit_checkpoints_tree_size", table_name="audit_checkpoints")
    op.drop_table("audit_checkpoints")
    op.drop_index("ix_audit_entries_subject_ref", table_name="audit_entries")
    op.drop_table("audit_entries")
    op.drop_table("audit_body_keys")
    op.drop_table("audit_log_state")
