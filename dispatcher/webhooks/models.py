"""Callback rows: each is one webhook to deliver, with its durable retry state."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Dialect, Index, Integer, String, TypeDecorator
from sqlalchemy.orm import Mapped, mapped_column

from dispatcher.db import Base, new_id, utcnow

# Sorted keys: whatever wrote the row, every attempt of one webhook-id carries
# byte-identical content. One encoder for all: json.dumps with options builds a new
# one per call, which cost more than encoding a payload (three per recipient sent).
_CANONICAL = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def body_text(payload: dict[str, Any]) -> str:
    """The canonical JSON text a payload is POSTed (and signed) as, and stored as."""
    return _CANONICAL.encode(payload)


class Payload(TypeDecorator[dict[str, Any]]):
    """A JSON column (``json`` on PostgreSQL) written as the very text a callback is sent as.

    Serialised once, when the row is written: a delivery attempt reads the text back
    (``CAST(payload AS TEXT)``; both databases keep a ``json`` value's text as given)
    and POSTs it, with no JSON decode and re-encode per attempt.
    """

    impl = JSON  # the column's type (``json`` on PostgreSQL, cast to it when bound)
    cache_ok = True

    # These two replace the JSON type's own processing instead of adding to it (which is
    # why they are not process_bind_param/process_result_value): the text goes to the
    # database as it is, serialised by us alone.
    def bind_processor(self, dialect: Dialect) -> Callable[[Any], str | None]:
        def process(value: Any) -> str | None:
            return None if value is None else body_text(value)

        return process

    def result_processor(self, dialect: Dialect, coltype: Any) -> Callable[[Any], Any]:
        def process(value: Any) -> Any:
            # psycopg hands a json column over decoded; SQLite gives its text.
            return json.loads(value) if isinstance(value, str) else value

        return process


class Callback(Base):
    __tablename__ = "callbacks"
    __table_args__ = (
        Index("ix_callbacks_state_next", "state", "next_attempt_at"),
        Index("ix_callbacks_account_state", "account_id", "state"),
    )

    # Also the webhook-id header: retries of one event reuse it.
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    account_id: Mapped[str] = mapped_column(String(36))
    # Indexed for the retention purge, which removes a batch's callbacks with it.
    batch_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    recipient_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    event_type: Mapped[str] = mapped_column(String(48))
    url: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[dict[str, Any]] = mapped_column(Payload)
    # pending -> delivering -> delivered | pending (retry) | dead; held while disabled.
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(nullable=True)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(nullable=True)


class Endpoint(Base):
    """Health of one callback URL of an account: failing long enough disables it."""

    __tablename__ = "callback_endpoints"

    account_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    url: Mapped[str] = mapped_column(String(2048), primary_key=True)
    failing_since: Mapped[datetime | None] = mapped_column(nullable=True)
    disabled_at: Mapped[datetime | None] = mapped_column(nullable=True)
