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
NAME = "ix_recipients_provider_ref"


def upgrade() -> None:
    # Nothing reads status events by recipient; the retention purge goes by batch.
    op.drop_index("ix_status_events_recipient_id", table_name="status_events")
    _rebuild(where=CARRIES_ONE)


def downgrade() -> None:
    _rebuild(where=None)
    index("ix_status_events_recipient_id", "status_events", ["recipient_id"])


def _rebuild(*, where: str | None) -> None:
    """The message-id index again, with ``where``.

    On PostgreSQL the new index is built ``CONCURRENTLY`` beside the old one and
    takes its name: a plain build would block every write to ``recipients`` (all
    sending) for as long as it reads the table. That cannot run in a transaction,
    so it commits what ran before it.
    """
    if op.get_bind().dialect.name != "postgresql":
        op.drop_index(NAME, table_name="recipients")
        index(NAME, "recipients", ["provider_message_id"], where=where)
        return
    with op.get_context().autocommit_block():
        op.execute(f"DROP INDEX IF EXISTS {NAME}_new")  # left by an interrupted build
        index(f"{NAME}_new", "recipients", ["provider_message_id"], where=where, concurrently=True)
        op.drop_index(NAME, table_name="recipients", postgresql_concurrently=True)
        op.execute(f"ALTER INDEX {NAME}_new RENAME TO {NAME}")
