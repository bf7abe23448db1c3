"""Receipts that came before their message's outcome was recorded, kept until it is."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from dispatcher.db import Base, utcnow


class PendingReceipt(Base):
    """A carrier's receipt for a message id no ``sent`` recipient carries yet."""

    __tablename__ = "pending_receipts"
    __table_args__ = (
        Index("ix_pending_receipts_ref", "provider", "provider_message_id"),
        Index("ix_pending_receipts_received_at", "received_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(32))
    provider_message_id: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16))
    error_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error_text: Mapped[str | None] = mapped_column(String(500), nullable=True)
    # The carrier's own time of the final state (SMPP "done date"), when it gives one.
    done_at: Mapped[datetime | None] = mapped_column(nullable=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
