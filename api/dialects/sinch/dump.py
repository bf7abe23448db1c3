"""Batches as Sinch batch objects (through schemas.BatchReply)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from api.dialects.sinch.schemas import BatchReply
from dispatcher.batches.models import Batch
from dispatcher.states import BatchStatus

_REPLY = BatchReply()
_OPTIONS = (
    "udh",
    "parameters",
    "client_reference",
    "truncate_concat",
    "max_number_of_message_parts",
    "from_ton",
    "from_npi",
)


def batch_object(batch: Batch, to: Sequence[str]) -> dict[str, Any]:
    """The fields of a Sinch batch, before dumping."""
    options = batch.options or {}
    return {
        "id": batch.id,
        "to": list(to),
        "sender": batch.sender,
        "canceled": batch.status == BatchStatus.CANCELLED,
        "body": batch.body,
        "type": options.get("type", "mt_text"),
        "created_at": batch.created_at,
        "modified_at": batch.modified_at,
        "delivery_report": options.get("delivery_report", "none"),
        "send_at": batch.send_at,
        "expire_at": batch.expire_at,
        "callback_url": batch.callback_url,
        "feedback_enabled": bool(options.get("feedback_enabled", False)),
        "flash_message": bool(options.get("flash_message", False)),
        **{name: options.get(name) for name in _OPTIONS},
    }


def dump_batch(batch: Batch, to: Sequence[str]) -> dict[str, Any]:
    """A batch as Sinch returns it."""
    return _REPLY.dump(batch_object(batch, to))
