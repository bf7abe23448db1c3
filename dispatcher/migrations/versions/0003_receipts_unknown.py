"""pending_receipts (receipts before their outcome is recorded) and recipients.provider

Create Date: 2026-11-29 21:00:00

The new recipient status ``unknown`` needs no DDL: statuses are stored as strings.
"""

from alembic import op

from dispatcher.migrations.shapes import create_table, error, moment, serial, string

revision = "0003_receipts_unknown"
down_revision = "0002"


def upgrade() -> None:
    create_table(
        "pending_receipts",
        serial(),
        string("provider", 32),
        string("provider_message_id", 100),
        string("status", 16),
        *error(),
        moment("done_at", nullable=True),
        moment("received_at"),
        indexes={
            "ix_pending_receipts_ref": ["provider", "provider_message_id"],
            "ix_pending_receipts_received_at": ["received_at"],
        },
    )
    with op.batch_alter_table("recipients") as batch_op:
        batch_op.add_column(string("provider", 32, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("recipients") as batch_op:
        batch_op.drop_column("provider")
    op.drop_table("pending_receipts")
