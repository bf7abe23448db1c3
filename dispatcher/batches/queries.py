"""Reading batches after intake: pages of batches, their numbers, one recipient."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dispatcher.accounts.models import Account
from dispatcher.batches.models import Batch, Recipient
from dispatcher.errors import NotFound


def destinations_of(*, session: Session, batch_ids: Sequence[str]) -> dict[str, list[str]]:
    """Each batch's recipient numbers, in batch order."""
    out: dict[str, list[str]] = {bid: [] for bid in batch_ids}
    if not batch_ids:
        return out
    rows = session.execute(
        select(Recipient.batch_id, Recipient.to)
        .where(Recipient.batch_id.in_(batch_ids))
        .order_by(Recipient.batch_id, Recipient.seq)
    )
    for bid, to in rows:
        out[bid].append(to)
    return out


def list_batches(
    *,
    session: Session,
    account: Account,
    page: int,
    page_size: int,
    senders: Sequence[str] = (),
    start: datetime | None = None,
    end: datetime | None = None,
    client_reference: str | None = None,
) -> tuple[list[Batch], int]:
    """One page of the account's batches, newest first, and how many match in all."""
    query = select(Batch).where(Batch.account_id == account.id)
    if senders:
        query = query.where(Batch.sender.in_(list(senders)))
    if start is not None:
        query = query.where(Batch.created_at >= start)
    if end is not None:
        query = query.where(Batch.created_at < end)
    if client_reference is not None:
        query = query.where(Batch.options["client_reference"].as_string() == client_reference)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(
        query.order_by(Batch.created_at.desc(), Batch.id).offset(page * page_size).limit(page_size)
    )
    return list(rows), total


def get_recipient(*, session: Session, batch: Batch, to: str) -> Recipient:
    """The batch's recipient with number ``to`` (NotFound otherwise)."""
    row = session.scalar(
        select(Recipient)
        .where(Recipient.batch_id == batch.id, Recipient.to == to)
        .order_by(Recipient.seq)
        .limit(1)
    )
    if row is None:
        raise NotFound(f"{to} is not a recipient of batch {batch.id}")
    return row
