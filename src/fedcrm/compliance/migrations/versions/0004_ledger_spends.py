"""Privacy ledger: the branch's spend id and the serialised DP event of every row.

Revision ID: 0004_ledger_spends
Revises: 0003_lineage
Create Date: 2026-12-04

``spend_id`` is the id a branch's accountant gave the spend (reserved before it trained): one
spend is recorded once per (branch, model, purpose), so reconciling a branch's accountant with
the ledger after a crash can never count a round twice. ``dp_event`` is the row's mechanism as
a dp-accounting-style event (JSON), from which ``fedcrm ledger recompute`` recomputes ε.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_ledger_spends"
down_revision: str | None = "0003_lineage"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``spend_id`` (unique per branch, model and purpose) and ``dp_event``."""
    with op.batch_alter_table("privacy_ledger") as batch:
        batch.add_column(sa.Column("spend_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("dp_event", sa.Text(), nullable=True))
    op.create_index(
        "uq_privacy_ledger_spend",
        "privacy_ledger",
        ["branch", "model", "purpose", "spend_id"],
        unique=True,
    )


def downgrade() -> None:
    """Drop both columns (their evidence is lost: operators only)."""
    op.drop_index("uq_privacy_ledger_spend", table_name="privacy_ledger")
    with op.batch_alter_table("privacy_ledger") as batch:
        batch.drop_column("dp_event")
        batch.drop_column("spend_id")
