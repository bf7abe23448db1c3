"""Applying delivery receipts: unknown or late ones are ignored, never moved backwards."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from dispatcher.batches import events
from dispatcher.batches.models import Batch, Recipient
from dispatcher.channels.base import Receipt
from dispatcher.states import RECIPIENT_TRANSITIONS, RecipientStatus

__all__ = ["RECEIPT_STATUSES", "Receipt", "apply_many"]

RECEIPT_STATUSES = {
    "delivered": RecipientStatus.DELIVERED,
    "failed": RecipientStatus.FAILED,
    "expired": RecipientStatus.EXPIRED,
}


def apply_many(*, session: Session, receipts: Sequence[Receipt], now: datetime) -> int:
    """Apply receipts; returns how many changed a recipient (the rest were unknown or stale)."""
    wanted = {r.provider_message_id for r in receipts}
    if not wanted:
        return 0
    found = {
        rec.provider_message_id: rec
        # Locked (in id order, against deadlocks): a carrier retrying a receipt
        # concurrently must see this one's outcome, not the state before it.
        for rec in session.scalars(
            select(Recipient)
            .where(Recipient.provider_message_id.in_(wanted))
            .order_by(Recipient.id)
            .with_for_update()
        )
    }
    changes: dict[tuple[str, RecipientStatus], list[events.Change]] = defaultdict(list)
    applied = 0
    for receipt in receipts:
        rec = found.get(receipt.provider_message_id)
        new = RECEIPT_STATUSES.get(receipt.status)
        # Unknown message, unknown status, or a move the state machine forbids
        # (already final, or out of order): acknowledged and ignored.
        if rec is None or new is None or new not in RECIPIENT_TRANSITIONS[rec.status]:
            continue
        rec.status = new
        rec.updated_at = now
        if new is not RecipientStatus.DELIVERED:
            rec.error_code = receipt.error_code or new.value
            rec.error_text = receipt.error_text
        changes[(rec.batch_id, new)].append(events.Change.of(rec))
        applied += 1
    session.flush()
    for (batch_id, status), batch_changes in changes.items():
        batch = session.get(Batch, batch_id)
        assert batch is not None
        events.record(session=session, batch=batch, status=status, changes=batch_changes, at=now)
    return applied
