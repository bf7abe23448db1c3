"""JSON forms of batches and recipients in the native dialect."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from dispatcher.batches.models import Batch, Recipient


def iso(at: datetime | None) -> str | None:
    """Naive UTC as ISO 8601 with Z."""
    return at.isoformat(timespec="seconds") + "Z" if at else None


def dump_batch(batch: Batch, counts: dict[str, int]) -> dict[str, Any]:
    """A batch with its recipient counts per state."""
    return {
        "identifier": batch.id,
        "id": batch.client_id,
        "status": batch.status.value,
        "from": batch.sender,
        "message": batch.body,
        "channels": batch.channels,
        "callback": batch.callback_url,
        "sendAt": iso(batch.send_at),
        "expireAt": iso(batch.expire_at),
        "createdAt": iso(batch.created_at),
        "completedAt": iso(batch.completed_at),
        "recipients": batch.recipient_count,
        "counts": counts,
    }


def dump_recipient(r: Recipient) -> dict[str, Any]:
    """One recipient's status."""
    return {
        "messageUuid": r.id,
        "to": r.to,
        "status": r.status.value,
        "channel": r.channel,
        "attempts": r.attempts,
        "parts": r.parts,
        "providerMessageId": r.provider_message_id,
        "error": {"code": r.error_code, "text": r.error_text} if r.error_code else None,
        "sentAt": iso(r.sent_at),
        "updatedAt": iso(r.updated_at),
        "id": r.client_id,
    }
