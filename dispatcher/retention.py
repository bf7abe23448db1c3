"""Retention: finished batches older than ``retention_days`` are removed, in small steps.

A batch goes, with its recipients, attempts, status events and callbacks, once
all of these hold (checked again in every step, so a batch that changes midway
is left alone):

- it is finished (completed, cancelled or expired);
- it finished (``completed_at``) and was created more than ``retention_days``
  ago: reports read it until then, and its client id stays taken, so a retried
  POST within that window still returns the original batch instead of sending
  again; and more than ``receipt_deadline`` ago, so that no message it sent still
  waits for its final status;
- none of its callbacks is still to be delivered (pending, delivering or held):
  the client gets every event before its record goes.

Each step is one short transaction that deletes at most ``retention_chunk``
rows of one table, so on SQLite the write lock is never held for long and
sending goes on between the steps. ``retention_days = 0`` keeps everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Delete, delete, exists, select
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.batches.models import Attempt, Batch, Recipient, StatusEvent
from dispatcher.config import Settings
from dispatcher.db import read_transaction, transaction
from dispatcher.states import OPEN_BATCH, BatchStatus, CallbackState
from dispatcher.webhooks.models import Callback

FINISHED_BATCH = frozenset(BatchStatus) - OPEN_BATCH
# Callbacks in these states still owe the client an event.
OPEN_CALLBACK = (CallbackState.PENDING, CallbackState.DELIVERING, CallbackState.HELD)


@dataclass
class PurgeReport:
    """Rows removed per table by one purge run."""

    # Rows deleted per table (recipients, attempts, status_events, callbacks, batches).
    rows: dict[str, int] = field(default_factory=dict)

    def add(self, table: str, count: int) -> None:
        self.rows[table] = self.rows.get(table, 0) + count

    @property
    def batches(self) -> int:
        return self.rows.get("batches", 0)

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe form (Celery task results)."""
        return dict(self.rows)


def cutoff(*, settings: Settings, now: datetime) -> datetime | None:
    """Batches finished and created before this may go; None when retention is off.

    Never sooner than ``receipt_deadline``: until then a message the batch sent may
    still be reported (its receipt, or ``unknown`` at the deadline), which needs its rows.
    """
    if settings.retention_days <= 0:
        return None
    keep = max(
        timedelta(days=settings.retention_days), timedelta(seconds=settings.receipt_deadline)
    )
    return now - keep


def _purgeable(before: datetime) -> Any:
    """The WHERE clause of a batch that may be purged (every step re-checks it)."""
    return (
        Batch.status.in_(FINISHED_BATCH),
        Batch.completed_at < before,
        Batch.created_at < before,
        ~exists().where(Callback.batch_id == Batch.id, Callback.state.in_(OPEN_CALLBACK)),
    )


def purgeable_batches(*, session: Session, before: datetime, limit: int) -> list[str]:
    """Ids of batches that may be purged, oldest finished first."""
    return list(
        session.scalars(
            select(Batch.id).where(*_purgeable(before)).order_by(Batch.completed_at).limit(limit)
        )
    )


def _still_purgeable(session: Session, batch_id: str, before: datetime) -> bool:
    return bool(session.scalar(select(exists().where(Batch.id == batch_id, *_purgeable(before)))))


def _rowcount(session: Session, statement: Delete) -> int:
    return cast(CursorResult[Any], session.execute(statement)).rowcount


def purge_step(*, session: Session, batch_id: str, before: datetime, chunk: int) -> dict[str, int]:
    """Delete one chunk of the batch's rows, children first: rows deleted per table.

    Empty when the batch must stay; holds ``batches`` when the batch row itself went.
    """
    if not _still_purgeable(session, batch_id, before):
        return {}
    ids = list(
        session.scalars(
            select(Recipient.id)
            .where(Recipient.batch_id == batch_id)
            .order_by(Recipient.seq)
            .limit(chunk)
        )
    )
    if ids:
        # A chunk of recipients goes with their attempts (attempts carry no batch id).
        attempts = _rowcount(session, delete(Attempt).where(Attempt.recipient_id.in_(ids)))
        count = _rowcount(session, delete(Recipient).where(Recipient.id.in_(ids)))
        return {"attempts": attempts, "recipients": count}
    for model in (StatusEvent, Callback):
        some = select(model.id).where(model.batch_id == batch_id).limit(chunk)
        count = _rowcount(session, delete(model).where(model.id.in_(some.scalar_subquery())))
        if count:
            return {str(model.__tablename__): count}
    return {"batches": _rowcount(session, delete(Batch).where(Batch.id == batch_id))}


def purge(
    *, factory: sessionmaker[Session], settings: Settings, now: datetime, max_batches: int = 100
) -> PurgeReport:
    """Remove up to ``max_batches`` finished batches past retention, one short transaction
    per chunk of rows."""
    report = PurgeReport()
    before = cutoff(settings=settings, now=now)
    if before is None:
        return report
    with read_transaction(factory) as session:
        batch_ids = purgeable_batches(session=session, before=before, limit=max_batches)
    for batch_id in batch_ids:
        while True:
            chunk = settings.retention_chunk
            with transaction(factory) as session:
                deleted = purge_step(session=session, batch_id=batch_id, before=before, chunk=chunk)
            for table, count in deleted.items():
                report.add(table, count)
            if not deleted or "batches" in deleted:
                break
    return report
