"""Recipient reports across an account's batches (Sinch's "List delivery reports")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from dispatcher.batches.models import Batch, Recipient

# At most this many recipient rows are read for one page: a filter that matches
# rarely over a busy day answers from the newest rows rather than scanning millions.
SCAN_LIMIT = 10_000


@dataclass(frozen=True)
class Row:
    """One recipient with its batch, as a report is built from."""

    batch: Batch
    recipient: Recipient


def recipient_rows(
    *,
    session: Session,
    account_id: str,
    start: datetime,
    end: datetime | None,
    keep: Callable[[Row], bool],
    page: int,
    page_size: int,
) -> tuple[list[Row], int]:
    """One page of the account's recipients changed in [start, end), newest first,
    those ``keep`` accepts; and how many it accepted in all (within SCAN_LIMIT)."""
    query = select(Recipient, Batch).join(Batch, Batch.id == Recipient.batch_id)
    query = query.where(Recipient.account_id == account_id, Recipient.updated_at >= start)
    if end is not None:
        query = query.where(Recipient.updated_at < end)
    query = query.order_by(Recipient.updated_at.desc(), Recipient.id).limit(SCAN_LIMIT)
    kept = [Row(b, r) for r, b in session.execute(query) if keep(Row(b, r))]
    return kept[page * page_size : (page + 1) * page_size], len(kept)
