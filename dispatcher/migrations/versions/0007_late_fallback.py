"""attempts keep the provider's error code (late channel fallback records it too)

Revision ID: 0007_late_fallback
Revises: 0006_sinch_groups_plans
Create Date: 2026-11-30 00:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_late_fallback"
down_revision = "0006_sinch_groups_plans"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("error_code", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("error_code")
