"""Service plan settings on accounts; Sinch groups and their members

Create Date: 2026-11-29 21:50:00
"""

import sqlalchemy as sa
from alembic import op

from dispatcher.migrations.shapes import create_table, moment, string, uuid

revision = "0006_sinch_groups_plans"
down_revision = "0005_smpp_inbound"


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch_op:
        batch_op.add_column(string("default_originator", 64, nullable=True))
        batch_op.add_column(string("default_callback_url", 2048, nullable=True))
        batch_op.add_column(
            sa.Column("callback_signing", sa.String(16), nullable=False, server_default="standard")
        )
    create_table(
        "sinch_groups",
        uuid(),
        uuid("account_id", sa.ForeignKey("accounts.id")),
        string("name", 200, nullable=True),
        moment("created_at"),
        moment("modified_at"),
        indexes={"ix_sinch_groups_account_id": ["account_id", "created_at"]},
    )
    create_table(
        "sinch_group_members",
        uuid("group_id", sa.ForeignKey("sinch_groups.id", ondelete="CASCADE")),
        string("msisdn", 32),
        key=("group_id", "msisdn"),
    )


def downgrade() -> None:
    op.drop_table("sinch_group_members")
    op.drop_table("sinch_groups")
    with op.batch_alter_table("accounts") as batch_op:
        batch_op.drop_column("callback_signing")
        batch_op.drop_column("default_callback_url")
        batch_op.drop_column("default_originator")
