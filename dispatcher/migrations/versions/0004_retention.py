"""Indexes for the retention purge: finished batches by completion time, callbacks by batch

Create Date: 2026-11-29 21:10:00
"""

from alembic import op

revision = "0004_retention"
down_revision = "0003_receipts_unknown"


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch_op:
        batch_op.create_index(
            "ix_batches_status_completed", ["status", "completed_at"], unique=False
        )
    with op.batch_alter_table("callbacks") as batch_op:
        batch_op.create_index("ix_callbacks_batch_id", ["batch_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("callbacks") as batch_op:
        batch_op.drop_index("ix_callbacks_batch_id")
    with op.batch_alter_table("batches") as batch_op:
        batch_op.drop_index("ix_batches_status_completed")
