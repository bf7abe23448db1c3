"""JSON forms of batches, recipients and /message entries in the native dialect."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from api.dialects.mplus import replies
from dispatcher.batches import service
from dispatcher.batches.models import Batch, Recipient


def iso(at: datetime | None) -> str | None:
    """Naive UTC as ISO 8601 with Z."""
    return at.isoformat(timespec="seconds") + "Z" if at else None


def dump_batch(batch: Batch, counts: dict[str, int]) -> dict[str, Any]:
    """A batch with its recipient counts per state."""
    return replies.Batch().dump(
        {
            "identifier": batch.id,
            "id": batch.client_id,
            "status": batch.status.value,
            "sender": batch.sender,
            "message": batch.body,
            "channels": batch.channels,
            "callback": batch.callback_url,
            "sendAt": batch.send_at,
            "expireAt": batch.expire_at,
            "createdAt": batch.created_at,
            "completedAt": batch.completed_at,
            "recipients": batch.recipient_count,
            "counts": counts,
        }
    )


def recipient_fields(r: Recipient) -> dict[str, Any]:
    """One recipient's status, before dumping (replies.Recipient or replies.ReportRow)."""
    return {
        "messageUuid": r.id,
        "to": r.to,
        "status": r.status.value,
        "channel": r.channel,
        "attempts": r.attempts,
        "parts": r.parts,
        "providerMessageId": r.provider_message_id,
        "error": {"code": r.error_code, "text": r.error_text} if r.error_code else None,
        "sentAt": r.sent_at,
        "updatedAt": r.updated_at,
        "id": r.client_id,
    }


def dump_page(batch: Batch, rows: list[Recipient], total: int, query: dict[str, Any]) -> Any:
    """GET /batch/{id}/messages: one page of recipients."""
    return replies.MessagesPage().dump(
        {
            "batchUuid": batch.id,
            "page": query["page"],
            "pageSize": query["page_size"],
            "total": total,
            "messages": [recipient_fields(r) for r in rows],
        }
    )


def message_of(entry: dict[str, Any]) -> service.NewMessage:
    """A validated POST /message entry as the service takes it."""
    return service.NewMessage(
        to=entry["to"],
        body=entry["body"],
        sender=entry["sender"].get("value"),
        shared_sender=entry["sender"]["type"] == "shared",
        channels=entry["channels"],
        callback_url=entry["callback"],
        send_at=entry["send_at"],
        client_id=entry["id"],
    )


def dump_message(
    to_as_sent: str,
    m: service.NewMessage,
    sender: str,
    batch: Batch | None,
    *,
    session: Session,
) -> dict[str, Any]:
    """One entry of the POST /message reply, as "Add Message" shows it (``to`` as sent)."""
    return {
        "to": to_as_sent,
        "body": m.body,
        "sender": {"type": "shared" if m.shared_sender else "custom", "value": sender},
        "batchUuid": batch.id if batch else None,
        "messageUuid": service.first_recipient_id(session=session, batch=batch) if batch else None,
        "scheduled": m.send_at is not None,
    }


def batch_of(data: dict[str, Any], *, allow_multi: bool) -> service.NewBatch:
    """A validated POST /batch body as the service takes it (allowMulti=false: one part)."""
    return service.NewBatch(
        sender=data["sender"],
        body=data["message"],
        destinations=data["destinations"],
        channels=data["channels"],
        callback_url=data["callback"],
        send_at=data["send_at"],
        client_id=data["id"],
        max_parts=None if allow_multi else 1,
        options=(
            {"whatsapp_template": data["whatsapp_template"]} if data["whatsapp_template"] else {}
        ),
    )


def dump_dry_run(report: service.DryRun) -> dict[str, Any]:
    """What a dry run of POST /batch would have sent."""
    return replies.DryRun().dump(
        {
            "identifier": None,
            "dryRun": True,
            "recipients": report.recipients,
            "parts": report.parts,
            "encoding": report.encoding,
        }
    )
