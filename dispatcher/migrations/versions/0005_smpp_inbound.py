"""inbound messages, dedicated numbers and inbound webhooks (SMPP MO)

Create Date: 2026-11-29 21:00:00
"""

import sqlalchemy as sa
from alembic import op

from dispatcher.migrations.shapes import column, create_table, moment, string, uuid

revision = "0005_smpp_inbound"
down_revision = "0004_retention"


def upgrade() -> None:
    create_table(
        "inbound_messages",
        uuid(),
        uuid("account_id", nullable=True),
        string("sender", 32),
        string("to", 32),
        column("body", sa.Text()),
        string("carrier", 64),
        string("connection", 64),
        column("data_coding", sa.Integer()),
        moment("received_at"),
        indexes={"ix_inbound_account_received": ["account_id", "received_at"]},
    )
    create_table(
        "inbound_numbers",
        string("number", 32),
        uuid("account_id"),
        moment("created_at"),
        key=("number",),
        indexes={"ix_inbound_numbers_account_id": ["account_id"]},
    )
    create_table(
        "inbound_webhooks",
        uuid("account_id"),
        string("url", 2048),
        string("dialect", 16),
        moment("created_at"),
        key=("account_id",),
    )


def downgrade() -> None:
    for table in ("inbound_webhooks", "inbound_numbers", "inbound_messages"):
        op.drop_table(table)
