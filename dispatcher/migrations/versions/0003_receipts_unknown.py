"""pending_receipts (receipts before their outcome is recorded) and recipients.provider

Revision ID: 0003_receipts_unknown
Revises: 0002
Create Date: 2026-11-29 21:00:00

The new recipient status ``unknown`` needs no DDL: statuses are stored as strings.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_receipts_unknown"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pending_receipts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("provider_message_id", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error_code", sa.String(length=32), nullable=True),
        sa.Column("error_text", sa.String(length=500), nullable=True),
        sa.Column("done_at", sa.DateTime(), nullable=True),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pending_receipts")),
    )
    with op.batch_alter_table("pending_receipts") as batch_op:
        batch_op.create_index(
            "ix_pending_receipts_ref", ["provider", "provider_message_id"], unique=False
        )
        batch_op.create_index("ix_pending_receipts_received_at", ["received_at"], unique=False)
    with op.batch_alter_table("recipients") as batch_op:
        batch_op.add_column(sa.Column("provider", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("recipients") as batch_op:
        batch_op.drop_column("provider")
    with op.batch_alter_table("pending_receipts") as batch_op:
        batch_op.drop_index("ix_pending_receipts_received_at")
        batch_op.drop_index("ix_pending_receipts_ref")
    op.drop_table("pending_receipts")
