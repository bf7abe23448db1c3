"""inbound messages, dedicated numbers and inbound webhooks (SMPP MO)

Revision ID: 0005_smpp_inbound
Revises: 0004_retention
Create Date: 2026-11-29 21:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_smpp_inbound"
down_revision = "0004_retention"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inbound_messages",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("account_id", sa.String(length=36), nullable=True),
        sa.Column("sender", sa.String(length=32), nullable=False),
        sa.Column("to", sa.String(length=32), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("carrier", sa.String(length=64), nullable=False),
        sa.Column("connection", sa.String(length=64), nullable=False),
        sa.Column("data_coding", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbound_messages")),
    )
    op.create_index(
        "ix_inbound_account_received", "inbound_messages", ["account_id", "received_at"]
    )
    op.create_table(
        "inbound_numbers",
        sa.Column("number", sa.String(length=32), nullable=False),
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("number", name=op.f("pk_inbound_numbers")),
    )
    op.create_index(op.f("ix_inbound_numbers_account_id"), "inbound_numbers", ["account_id"])
    op.create_table(
        "inbound_webhooks",
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("dialect", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_inbound_webhooks")),
    )


def downgrade() -> None:
    op.drop_table("inbound_webhooks")
    op.drop_index(op.f("ix_inbound_numbers_account_id"), table_name="inbound_numbers")
    op.drop_table("inbound_numbers")
    op.drop_index("ix_inbound_account_received", table_name="inbound_messages")
    op.drop_table("inbound_messages")
