"""What a status change looks like to the client, per dialect.

The native (Messaging Plus) payload is one JSON object per recipient event;
``builders.BUILDERS`` says which builder each dialect uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from dispatcher.states import RecipientStatus

if TYPE_CHECKING:
    from dispatcher.batches.events import Change
    from dispatcher.batches.models import Batch


@dataclass(frozen=True)
class PendingCallback:
    """A webhook to write as a callback row."""

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
    if not batch.callback_url:
        return []
    out = []
    for c in changes:
        payload: dict[str, Any] = {
            "type": f"message.{status.value}",
            "batchUuid": batch.id,
            "messageUuid": c.recipient_id,
            "to": c.to,
            "from": batch.sender,
            "channel": c.channel,
            "status": status.value,
            "error": (
                {"code": c.error_code, "text": c.error_text}
                if c.error_code or c.error_text
                else None
            ),
            "timestamp": iso(at),
            "id": c.client_id or batch.client_id,
        }
        out.append(PendingCallback(batch.callback_url, payload["type"], payload, c.recipient_id))
    return out
