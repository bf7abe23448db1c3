"""recipients' provider message id index: partial; status events not indexed by recipient

Create Date: 2026-11-30 02:20:00
"""

from alembic import op

from dispatcher.migrations.shapes import index

revision = "0008_receipt_indexes"
down_revision = "0007_late_fallback"


# Every lookup by message id (receipts, reclaims) is an equality or IN, which implies
# this on both databases, also in PostgreSQL's generic plans for parameters.
CARRIES_ONE = "provider_message_id IS NOT NULL"


def upgrade() -> None:
    # Nothing reads status events by recipient; the retention purge goes by batch.
    op.drop_index("ix_status_events_recipient_id", table_name="status_events")
    op.drop_index("ix_recipients_provider_ref", table_name="recipients")
    index("ix_recipients_provider_ref", "recipients", ["provider_message_id"], where=CARRIES_ONE)


def downgrade() -> None:
    op.drop_index("ix_recipients_provider_ref", table_name="recipients")
    index("ix_recipients_provider_ref", "recipients", ["provider_message_id"])
    index("ix_status_events_recipient_id", "status_events", ["recipient_id"])
