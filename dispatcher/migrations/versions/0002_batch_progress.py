"""batches.progress_at: when a sending batch last made progress (stall detection)

Create Date: 2026-11-23 00:40:00
"""

from alembic import op

from dispatcher.migrations.shapes import moment

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch_op:
        batch_op.add_column(moment("progress_at", nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch_op:
        batch_op.drop_column("progress_at")
