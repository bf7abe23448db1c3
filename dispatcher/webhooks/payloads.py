"""What a status change looks like to the client, per dialect.

The native (Messaging Plus) payload is one JSON object per recipient event;
``builders.BUILDERS`` says which builder each dialect uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from dispatcher.states import RecipientStatus

if TYPE_CHECKING:
    from dispatcher.batches.events import Change
    from dispatcher.batches.models import Batch


class PendingCallback(NamedTuple):
    """A webhook to write as a callback row (a named tuple: one is made per recipient moved)."""

    url: str
    event_type: str
    payload: dict[str, Any]
    recipient_id: str | None


def iso(at: datetime) -> str:
    """A naive UTC datetime as ISO 8601 with a Z."""
    return at.isoformat(timespec="milliseconds") + "Z"


def native(
    *, batch: Batch, status: RecipientStatus, changes: Sequence[Change], at: datetime
) -> list[PendingCallback]:
    """One ``message.<status>`` event per recipient, to the batch's callback URL."""
    url = batch.callback_url
    if not url:
        return []
    # What every event of the change shares is read once, not per recipient.
    event_type, value = f"message.{status.value}", status.value
    batch_id, sender, client_id, timestamp = batch.id, batch.sender, batch.client_id, iso(at)
    out = []
    for c in changes:
        payload: dict[str, Any] = {
            "type": event_type,
            "batchUuid": batch_id,
            "messageUuid": c.recipient_id,
            "to": c.to,
            "from": sender,
            "channel": c.channel,
            "status": value,
            "error": (
                {"code": c.error_code, "text": c.error_text}
                if c.error_code or c.error_text
                else None
            ),
            "timestamp": timestamp,
            "id": c.client_id or client_id,
        }
        out.append(PendingCallback(url, event_type, payload, c.recipient_id))
    return out
