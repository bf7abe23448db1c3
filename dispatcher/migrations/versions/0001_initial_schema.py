"""initial schema

Create Date: 2026-11-23 00:05:42.442961
"""

import sqlalchemy as sa
from alembic import op

from dispatcher.migrations.shapes import (
    column,
    create_table,
    error,
    moment,
    serial,
    status,
    string,
    uuid,
)

revision = "0001"
down_revision = None

# In creation order; downgrade drops them in reverse (their indexes go with them).
TABLES = (
    "accounts",
    "attempts",
    "callback_endpoints",
    "callbacks",
    "shared_senders",
    "status_events",
    "api_keys",
    "batches",
    "recipients",
)


def upgrade() -> None:
    create_table(
        "accounts",
        uuid(),
        string("name", 200),
        column("rate_limit", sa.Float(), nullable=True),
        string("webhook_secret", 100),
        string("previous_webhook_secret", 100, nullable=True),
        moment("created_at"),
    )
    create_table(
        "attempts",
        serial(),
        uuid("recipient_id"),
        string("channel", 16),
        string("outcome", 32),
        string("error", 500, nullable=True),
        string("provider_message_id", 100, nullable=True),
        moment("at"),
        indexes={
            "ix_attempts_recipient_id": ["recipient_id"],
        },
    )
    create_table(
        "callback_endpoints",
        uuid("account_id"),
        string("url", 2048),
        moment("failing_since", nullable=True),
        moment("disabled_at", nullable=True),
        key=("account_id", "url"),
    )
    create_table(
        "callbacks",
        uuid(),
        uuid("account_id"),
        uuid("batch_id", nullable=True),
        uuid("recipient_id", nullable=True),
        string("event_type", 48),
        string("url", 2048),
        column("payload", sa.JSON()),
        string("state", 16),
        column("attempts", sa.Integer()),
        moment("next_attempt_at"),
        moment("enqueued_at", nullable=True),
        column("last_status", sa.Integer(), nullable=True),
        string("last_error", 500, nullable=True),
        moment("created_at"),
        moment("delivered_at", nullable=True),
        indexes={
            "ix_callbacks_account_state": ["account_id", "state"],
            "ix_callbacks_state_next": ["state", "next_attempt_at"],
        },
    )
    create_table(
        "shared_senders",
        uuid("account_id"),
        string("destination", 32),
        string("sender", 64),
        moment("created_at"),
        key=("account_id", "destination"),
    )
    create_table(
        "status_events",
        serial(),
        uuid("recipient_id"),
        uuid("batch_id"),
        string("status", 16),
        string("channel", 16, nullable=True),
        *error(),
        moment("at"),
        indexes={
            "ix_status_events_batch_id": ["batch_id"],
            "ix_status_events_recipient_id": ["recipient_id"],
        },
    )
    create_table(
        "api_keys",
        uuid(),
        uuid("account_id"),
        string("prefix", 16),
        string("key_hash", 64),
        moment("created_at"),
        moment("revoked_at", nullable=True),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.UniqueConstraint("key_hash"),
        indexes={
            "ix_api_keys_account_id": ["account_id"],
        },
    )
    create_table(
        "batches",
        uuid(),
        uuid("account_id"),
        string("client_id", 100, nullable=True),
        string("fingerprint", 64),
        string("dialect", 16),
        string("sender", 64),
        column("body", sa.Text()),
        column("channels", sa.JSON()),
        string("callback_url", 2048, nullable=True),
        status("batchstatus", "scheduled queued sending completed cancelled expired"),
        moment("send_at"),
        moment("expire_at"),
        column("recipient_count", sa.Integer()),
        column("options", sa.JSON()),
        moment("created_at"),
        moment("modified_at"),
        moment("enqueued_at", nullable=True),
        moment("completed_at", nullable=True),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.UniqueConstraint("account_id", "client_id"),
        indexes={
            "ix_batches_account_created": ["account_id", "created_at"],
            "ix_batches_status_send_at": ["status", "send_at"],
        },
    )
    create_table(
        "recipients",
        uuid(),
        uuid("batch_id"),
        uuid("account_id"),
        column("seq", sa.Integer()),
        string("to", 32),
        column("body", sa.Text(), nullable=True),
        string("client_id", 100, nullable=True),
        status(
            "recipientstatus",
            "scheduled queued sending sent delivered failed expired cancelled rejected",
        ),
        column("channel_index", sa.Integer()),
        string("channel", 16),
        column("attempts", sa.Integer()),
        column("parts", sa.Integer()),
        moment("next_attempt_at", nullable=True),
        moment("claimed_at", nullable=True),
        moment("enqueued_at", nullable=True),
        string("provider_message_id", 100, nullable=True),
        *error(),
        moment("sent_at", nullable=True),
        moment("created_at"),
        moment("updated_at"),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"]),
        indexes={
            "ix_recipients_batch_seq": ["batch_id", "seq"],
            "ix_recipients_provider_ref": ["provider_message_id"],
            "ix_recipients_status_next": ["status", "next_attempt_at"],
        },
    )


def downgrade() -> None:
    for table in reversed(TABLES):
        op.drop_table(table)
