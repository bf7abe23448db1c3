"""Inbound message rows, the numbers that receive them, and where each account wants them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from dispatcher.db import Base, new_id, utcnow


class InboundMessage(Base):
    __tablename__ = "inbound_messages"
    __table_args__ = (Index("ix_inbound_account_received", "account_id", "received_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    # None when no number or shared sender maps it to an account (kept for operators).
    account_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    sender: Mapped[str] = mapped_column(String(32))
    to: Mapped[str] = mapped_column(String(32))
    body: Mapped[str] = mapped_column(Text)
    carrier: Mapped[str] = mapped_column(String(64))
    connection: Mapped[str] = mapped_column(String(64))
    data_coding: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class InboundNumber(Base):
    """A dedicated number: every message to it belongs to one account."""

    __tablename__ = "inbound_numbers"

    number: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(36), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class InboundWebhook(Base):
    """Where an account's inbound messages are posted, and in which shape."""

    __tablename__ = "inbound_webhooks"

    account_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    url: Mapped[str] = mapped_column(String(2048))
    # "sinch" (mo_text) or "native".
    dialect: Mapped[str] = mapped_column(String(16), default="native")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
