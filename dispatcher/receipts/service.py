"""Applying delivery receipts: unknown or late ones are ignored, never moved backwards."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import update
from sqlalchemy.orm import Session

from dispatcher import metrics
from dispatcher.batches import events
from dispatcher.batches.models import Batch, Recipient
from dispatcher.channels.base import Receipt
from dispatcher.states import RecipientStatus, recipient_sources

__all__ = ["RECEIPT_STATUSES", "Receipt", "apply_many"]

RECEIPT_STATUSES = {
    "delivered": RecipientStatus.DELIVERED,
    "failed": RecipientStatus.FAILED,
    "expired": RecipientStatus.EXPIRED,
    "read": RecipientStatus.READ,
}
# Where a receipt may move a message from: only ``sent``, but a read report also
# follows a delivered one (and a late delivery report after it changes nothing).
SOURCES = {RecipientStatus.READ: (RecipientStatus.SENT, RecipientStatus.DELIVERED)}


def apply_many(*, session: Session, receipts: Sequence[Receipt], now: datetime) -> int:
    """Apply receipts; returns how many changed a recipient (the rest were unknown or stale).

    One conditional UPDATE per outcome: only a ``sent`` message takes a receipt, so
    unknown ids, final messages and late or repeated receipts change nothing,
    and two carriers' retries racing on one message cannot both apply.
    """
    groups: dict[tuple[RecipientStatus, str | None, str | None], list[str]] = defaultdict(list)
    for receipt in receipts:
        new = RECEIPT_STATUSES.get(receipt.status)
        if new is None:
            continue
        if new in (RecipientStatus.DELIVERED, RecipientStatus.READ):
            groups[(new, None, None)].append(receipt.provider_message_id)
        else:
            code: str | None = receipt.error_code or new.value
            groups[(new, code, receipt.error_text)].append(receipt.provider_message_id)
    applied = 0
    for (new, code, text), refs in groups.items():
        current = SOURCES.get(new, (RecipientStatus.SENT,))
        assert set(current) <= set(recipient_sources(new))
        rows = session.execute(
            update(Recipient)
            .where(
                Recipient.provider_message_id.in_(refs),
                Recipient.status.in_(current),
            )
            .values(status=new, updated_at=now, error_code=code, error_text=text)
            .returning(Recipient.batch_id, *events.CHANGE_COLUMNS)
        ).all()
        by_batch: dict[str, list[events.Change]] = defaultdict(list)
        for row in rows:
            by_batch[row[0]].append(events.Change.from_row(row[1:]))
        for batch_id, changes in by_batch.items():
            batch = session.get(Batch, batch_id)
            assert batch is not None
            events.record(session=session, batch=batch, status=new, changes=changes, at=now)
        applied += len(rows)
    metrics.receipts_applied(received=len(receipts), applied=applied)
    return applied
