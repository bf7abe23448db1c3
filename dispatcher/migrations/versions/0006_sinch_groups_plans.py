"""Service plan settings on accounts; Sinch groups and their members

Revision ID: 0006_sinch_groups_plans
Revises: 0005_smpp_inbound
Create Date: 2026-11-29 21:50:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_sinch_groups_plans"
down_revision = "0005_smpp_inbound"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch_op:
        batch_op.add_column(sa.Column("default_originator", sa.String(64), nullable=True))
        batch_op.add_column(sa.Column("default_callback_url", sa.String(2048), nullable=True))
        batch_op.add_column(
            sa.Column("callback_signing", sa.String(16), nullable=False, server_default="standard")
        )
    op.create_table(
        "sinch_groups",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("modified_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_sinch_groups_account_id", "sinch_groups", ["account_id", "created_at"])
    op.create_table(
        "sinch_group_members",
        sa.Column(
            "group_id",
            sa.String(36),
            sa.ForeignKey("sinch_groups.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("msisdn", sa.String(32), primary_key=True),
    )


def downgrade() -> None:
    op.drop_table("sinch_group_members")
    op.drop_index("ix_sinch_groups_account_id", table_name="sinch_groups")
    op.drop_table("sinch_groups")
    with op.batch_alter_table("accounts") as batch_op:
        batch_op.drop_column("callback_signing")
        batch_op.drop_column("default_callback_url")
        batch_op.drop_column("default_originator")
