"""attempts keep the provider's error code; the rich messages a late fallback left, indexed

Create Date: 2026-11-30 00:00:00
"""

import sqlalchemy as sa
from alembic import op

from dispatcher.migrations.shapes import string

revision = "0007_late_fallback"
down_revision = "0006_sinch_groups_plans"


LATE = sa.text("outcome = 'receipt:channel'")


def upgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(string("error_code", 32, nullable=True))
    op.create_index(
        "ix_attempts_late_ref",
        "attempts",
        ["provider_message_id"],
        sqlite_where=LATE,
        postgresql_where=LATE,
    )


def downgrade() -> None:
    op.drop_index("ix_attempts_late_ref", table_name="attempts")
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("error_code")
