"""Batch, recipient, attempt and status-event rows: the record of everything."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from dispatcher.db import Base, new_id, utcnow
from dispatcher.states import BatchStatus, RecipientStatus


def _enum(cls: type) -> Enum:
    return Enum(cls, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (
        UniqueConstraint("account_id", "client_id"),
        # The scheduler's promotion query: due batches by status and time.
        Index("ix_batches_status_send_at", "status", "send_at"),
        Index("ix_batches_account_created", "account_id", "created_at"),
        # The retention purge: finished batches, oldest first.
        Index("ix_batches_status_completed", "status", "completed_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    # The client's own id for the batch (Messaging Plus id/uuid): idempotency key.
    client_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # SHA-256 of the canonical request, to tell a retry from a conflicting reuse of client_id.
    fingerprint: Mapped[str] = mapped_column(String(64))
    dialect: Mapped[str] = mapped_column(String(16), default="mplus")
    sender: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    channels: Mapped[list[str]] = mapped_column(JSON)
    callback_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    status: Mapped[BatchStatus] = mapped_column(_enum(BatchStatus), default=BatchStatus.SCHEDULED)
    send_at: Mapped[datetime] = mapped_column(default=utcnow)
    expire_at: Mapped[datetime]
    recipient_count: Mapped[int] = mapped_column(Integer, default=0)
    # Dialect extras (Sinch delivery_report, client_reference, parameters...).
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    modified_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # When a dispatch task was last published; the scheduler re-publishes stale ones.
    enqueued_at: Mapped[datetime | None] = mapped_column(nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Last dispatch or recorded hand-off: a sending batch idle past stall_after lost its worker.
    progress_at: Mapped[datetime | None] = mapped_column(nullable=True)


# Rows that carry a provider message id (accepted once): receipts look them up by it.
_CARRIES_REF = text("provider_message_id IS NOT NULL")


class Recipient(Base):
    __tablename__ = "recipients"
    __table_args__ = (
        Index("ix_recipients_batch_seq", "batch_id", "seq"),
        Index("ix_recipients_status_next", "status", "next_attempt_at"),
        # Partial: a row is written and moved three times before it carries an id, and
        # every lookup by id (an equality or IN) implies it, on both databases.
        Index(
            "ix_recipients_provider_ref",
            "provider_message_id",
            sqlite_where=_CARRIES_REF,
            postgresql_where=_CARRIES_REF,
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id"))
    account_id: Mapped[str] = mapped_column(String(36))
    # Position in the batch: chunks are seq ranges, sent in order.
    seq: Mapped[int] = mapped_column(Integer)
    to: Mapped[str] = mapped_column(String(32))
    # Per-recipient body when it differs from the batch's (Sinch parameters).
    body: Mapped[str | None] = mapped_column(Text, nullable=True)
    client_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    status: Mapped[RecipientStatus] = mapped_column(
        _enum(RecipientStatus), default=RecipientStatus.SCHEDULED
    )
    # Index into the batch's channels: fallback moves it forward.
    channel_index: Mapped[int] = mapped_column(Integer, default=0)
    channel: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    parts: Mapped[int] = mapped_column(Integer, default=1)
    # Durable retry timer: not attempted before this time.
    next_attempt_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # When a worker won the claim (queued -> sending); past the lease it is reconciled.
    claimed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # When a task covering it was last published (None: needs one).
    enqueued_at: Mapped[datetime | None] = mapped_column(nullable=True)
    provider_message_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # The provider that accepted it: receipts match on (provider, provider_message_id).
    provider: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error_text: Mapped[str | None] = mapped_column(String(500), nullable=True)
    sent_at: Mapped[datetime | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


# The outcome of an Attempt row that a late channel failure wrote (engine/fallback.py).
LATE_CHANNEL_FAILURE = "receipt:channel"
_LATE = text(f"outcome = '{LATE_CHANNEL_FAILURE}'")


class _RecipientLog:
    """An append-only row about one recipient: a serial id, the recipient, its time."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    recipient_id: Mapped[str] = mapped_column(String(36), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class Attempt(_RecipientLog, Base):
    """One hand-off of a recipient to a provider on one channel, and its outcome."""

    __tablename__ = "attempts"
    __table_args__ = (
        # The rich messages a late failure moved on from: their later receipts are
        # acknowledged as ignored. Partial, so no other attempt pays for it.
        Index(
            "ix_attempts_late_ref",
            "provider_message_id",
            sqlite_where=_LATE,
            postgresql_where=_LATE,
        ),
    )

    channel: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str] = mapped_column(String(32))
    # The provider's code (e.g. whatsapp_131026) and text of a refusal or a late failure.
    error_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error: Mapped[str | None] = mapped_column(String(500), nullable=True)
    provider_message_id: Mapped[str | None] = mapped_column(String(100), nullable=True)


class StatusEvent(_RecipientLog, Base):
    """One recipient status change, as reported to the client."""

    __tablename__ = "status_events"

    # Not indexed: nothing reads events by recipient (the purge goes by batch), and
    # three events per recipient paid for the index on every insert.
    recipient_id: Mapped[str] = mapped_column(String(36))
    batch_id: Mapped[str] = mapped_column(String(36), index=True)
    status: Mapped[str] = mapped_column(String(16))
    channel: Mapped[str | None] = mapped_column(String(16), nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error_text: Mapped[str | None] = mapped_column(String(500), nullable=True)


class SharedSender(Base):
    """Which shared sender ID an account used for a destination (sticky, per "Add Message")."""

    __tablename__ = "shared_senders"

    account_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    destination: Mapped[str] = mapped_column(String(32), primary_key=True)
    sender: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
