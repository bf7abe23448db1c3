"""Reading back what the code under test wrote: a batch's recipients and callbacks, an
account's rows."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.batches.models import Batch, Recipient
from dispatcher.webhooks.models import Callback


def recipients(sessions: sessionmaker[Session], batch_id: str) -> list[Recipient]:
    """The batch's recipients in batch order."""
    with sessions() as session:
        return list(
            session.scalars(
                select(Recipient).where(Recipient.batch_id == batch_id).order_by(Recipient.seq)
            )
        )


def callbacks(sessions: sessionmaker[Session], batch_id: str) -> list[Callback]:
    """The batch's callbacks, oldest first."""
    with sessions() as session:
        return list(
            session.scalars(
                select(Callback).where(Callback.batch_id == batch_id).order_by(Callback.created_at)
            )
        )


def account_rows(sessions: sessionmaker[Session], account_id: str) -> tuple[int, int]:
    """How many batches and recipients the account has."""
    with sessions() as session:
        batches = session.scalar(
            select(func.count()).select_from(Batch).where(Batch.account_id == account_id)
        )
        count = session.scalar(
            select(func.count()).select_from(Recipient).where(Recipient.account_id == account_id)
        )
    return int(batches or 0), int(count or 0)
