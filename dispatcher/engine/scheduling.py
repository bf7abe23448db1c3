"""Durable timers: what the scheduler promotes from the database into the broker.

``send_at``, send retry times and callback retry times are columns. Only work due
within the horizon becomes a Celery ETA task; the periodic sweep also re-publishes
anything whose publish was lost (the ``enqueued_at`` markers). Every function here
is idempotent: running it twice, or with tasks already in flight, is harmless.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from operator import attrgetter

from sqlalchemy import ColumnElement, and_, exists, or_, select, update
from sqlalchemy.orm import Session

from dispatcher import outbox
from dispatcher.batches.models import Batch, Recipient
from dispatcher.batches.service import follow_send_at, promote_if_due
from dispatcher.batches.transitions import transition_batch, transition_recipients
from dispatcher.config import Settings
from dispatcher.outbox import TaskName, chunk_ranges
from dispatcher.states import BatchStatus, RecipientStatus

IN_FLIGHT = (RecipientStatus.SCHEDULED, RecipientStatus.QUEUED, RecipientStatus.SENDING)


def dispatch_batch(*, session: Session, settings: Settings, batch_id: str, now: datetime) -> int:
    """Fan a due batch out into chunk tasks, in batch order; returns how many were queued."""
    # Locked: a cancel or an update committed after an unlocked read would be overwritten
    # by follow_send_at's write of the loaded row (PostgreSQL).
    batch = session.get(Batch, batch_id, with_for_update=True)
    if batch is None or batch.status not in (BatchStatus.SCHEDULED, BatchStatus.QUEUED):
        return 0
    if batch.send_at > now + timedelta(seconds=1):
        # Rescheduled after its task was published: wait again, in the database if far.
        follow_send_at(session=session, settings=settings, batch=batch, now=now)
        return 0
    moved = transition_batch(
        session=session,
        batch_id=batch.id,
        to=BatchStatus.SENDING,
        # Never a completed batch: only a late fallback re-opens one (engine/fallback.py).
        current=(BatchStatus.SCHEDULED, BatchStatus.QUEUED),
        # Re-checked in the same statement: an update that moved send_at later
        # and committed after the read above must not let the batch go early.
        where=[Batch.send_at <= now + timedelta(seconds=1)],
        values={"enqueued_at": now, "progress_at": now},
        at=now,
    )
    if not moved:
        return 0
    session.refresh(batch)
    queued = transition_recipients(
        session=session,
        to=RecipientStatus.QUEUED,
        current=(RecipientStatus.SCHEDULED,),
        where=[Recipient.batch_id == batch.id],
        values={"enqueued_at": now},
        at=now,
        batch=batch,
    )
    for start, end in chunk_ranges(count=batch.recipient_count, size=settings.chunk_size):
        outbox.defer(
            session,
            outbox.Message(TaskName.SEND_CHUNK, {"batch_id": batch.id, "start": start, "end": end}),
        )
    if not queued:
        complete_if_done(session=session, batch_id=batch.id, now=now)
    session.flush()
    return len(queued)


def promote_due(
    *, session: Session, settings: Settings, now: datetime, limit: int = 500, requeue: bool = True
) -> int:
    """Publish batches due within the horizon, and re-publish dispatches that were lost.

    ``requeue``: also publish again what was published long ago and shows no sign of
    having run: lost dispatches, stalled batches, recipients past ``requeue_after``.
    False while the dispatch or send queue has no consumer: those tasks are still in
    the queue, and publishing them again every stall would pile up copies of each for
    as long as the workers are away. What was never published goes out either way.

    It waits for no row another transaction holds, and skips such a row instead (that
    transaction is moving it; the next sweep finds it if not): it holds many batches and
    recipients, taken in no order another transaction could share, so any wait could
    close a deadlock (PostgreSQL), with the expiry first of all.

    The long part, re-publishing waiting recipients (thousands of rows), comes first,
    before any batch row is taken: holding the batches, it made every send worker that
    ended a group of one wait for it (seconds, on a loaded PostgreSQL).
    """
    horizon = now + timedelta(seconds=settings.schedule_horizon)
    republished = _republish_waiting(
        session=session, settings=settings, now=now, limit=limit, requeue=requeue
    )
    due = session.scalars(
        select(Batch)
        .where(Batch.status == BatchStatus.SCHEDULED, Batch.send_at <= horizon)
        .order_by(Batch.send_at, Batch.created_at)
        .limit(limit)
        # promote_if_due writes the loaded rows: locked, or a cancel committed meanwhile
        # would be overwritten (PostgreSQL). One a cancel or an update holds is left to
        # the next sweep.
        .with_for_update(skip_locked=True)
    ).all()
    promoted = sum(
        promote_if_due(session=session, settings=settings, batch=b, now=now) for b in due
    )
    # A queued batch whose send time is well past but never dispatched lost its task.
    grace = now - timedelta(seconds=min(60.0, settings.requeue_after))
    unpublished: ColumnElement[bool] = Batch.enqueued_at.is_(None)
    if requeue:
        unpublished = or_(unpublished, Batch.enqueued_at < grace)
    lost = session.scalars(
        select(Batch)
        .where(Batch.status == BatchStatus.QUEUED, Batch.send_at < grace, unpublished)
        .order_by(Batch.send_at)
        .limit(limit)
        # Not waited for, as the due ones above: see _release_stalled.
        .with_for_update(skip_locked=True)
    ).all()
    for batch in lost:
        batch.enqueued_at = now
        outbox.defer(session, outbox.Message(TaskName.DISPATCH_BATCH, {"batch_id": batch.id}))
    # What it releases is re-published by the next sweep.
    if requeue:
        _release_stalled(session=session, settings=settings, now=now, limit=limit)
    session.flush()
    return promoted + len(lost) + republished


def _republish_waiting(
    *, session: Session, settings: Settings, now: datetime, limit: int, requeue: bool
) -> int:
    """Publish recipients waiting for a retry time, or (``requeue``) whose chunk task was
    lost long ago; returns how many. Takes no batch row."""
    horizon = now + timedelta(seconds=settings.schedule_horizon)
    waits: ColumnElement[bool] = and_(
        Recipient.enqueued_at.is_(None),
        or_(Recipient.next_attempt_at.is_(None), Recipient.next_attempt_at <= horizon),
    )
    if requeue:
        waits = or_(waits, Recipient.enqueued_at < now - timedelta(seconds=settings.requeue_after))
    waiting = session.execute(
        select(Recipient.id, Recipient.batch_id, Recipient.next_attempt_at)
        .where(
            Recipient.status == RecipientStatus.QUEUED,
            # Only a sending batch has work to hand out (a stopped one never again).
            Recipient.batch_id.in_(select(Batch.id).where(Batch.status == BatchStatus.SENDING)),
            waits,
        )
        .order_by(Recipient.next_attempt_at)
        .limit(limit * 10)
    ).all()
    by_batch: dict[tuple[str, datetime | None], list[str]] = {}
    for rid, bid, next_at in waiting:
        by_batch.setdefault((bid, next_at), []).append(rid)
    republished = 0
    for (bid, next_at), group in by_batch.items():
        # Rows another transaction holds are left to the next sweep (an expiry or a claim
        # is moving them): the sweep waits for no row (see promote_due).
        free = (
            select(Recipient.id)
            .where(Recipient.id.in_(group), Recipient.status == RecipientStatus.QUEUED)
            .with_for_update(skip_locked=True)
        )
        ids = list(
            session.scalars(
                update(Recipient)
                .where(Recipient.id.in_(free))
                .values(enqueued_at=now)
                .returning(Recipient.id),
                execution_options={"synchronize_session": False},
            )
        )
        if not ids:
            continue
        republished += len(ids)
        outbox.defer(
            session,
            outbox.Message(
                TaskName.SEND_RECIPIENTS, {"batch_id": bid, "recipient_ids": ids}, eta=next_at
            ),
        )
    return republished


def _release_stalled(*, session: Session, settings: Settings, now: datetime, limit: int) -> None:
    """Hand the queued recipients of stalled sending batches back to the sweep.

    A worker killed mid-chunk takes its running and prefetched chunk tasks with
    it, and the broker returns those only after its visibility timeout (hours).
    A sending batch with no recorded progress for ``stall_after`` is taken as
    such a loss; re-publishing is safe because every send starts with a claim.
    """
    stall = now - timedelta(seconds=settings.stall_after)
    stalled = session.scalars(
        select(Batch.id)
        .where(
            Batch.status == BatchStatus.SENDING,
            or_(Batch.progress_at.is_(None), Batch.progress_at < stall),
        )
        .limit(limit)
        # The batch rows first, as cancel takes them: recipients first, the two deadlocked.
        # None another transaction holds (see promote_due): an UPDATE of them all waited
        # for each in its plan's order (by id) while the expiry, holding one, waited for
        # another in its own order (PostgreSQL: a deadlock).
        .with_for_update(skip_locked=True)
    ).all()
    if not stalled:
        return
    session.execute(update(Batch).where(Batch.id.in_(stalled)).values(progress_at=now))
    # A row another transaction holds is being claimed or expired: not waited for either.
    idle = (
        select(Recipient.id)
        .where(
            Recipient.batch_id.in_(stalled),
            Recipient.status == RecipientStatus.QUEUED,
            Recipient.enqueued_at < stall,
        )
        .with_for_update(skip_locked=True)
    )
    session.execute(
        update(Recipient).where(Recipient.id.in_(idle)).values(enqueued_at=None),
        execution_options={"synchronize_session": False},
    )


def complete_if_done(*, session: Session, batch_id: str, now: datetime) -> bool:
    """End a batch once none of its recipients is in flight: completed, or expired if its
    expire_at stopped one of them from being handed over (see :func:`ended_as`)."""
    # The batch row first, as cancel, the record and a late fallback take it: a fallback
    # queueing a recipient again is then seen here once it committed (PostgreSQL), and
    # never finds its batch completed behind it.
    session.execute(select(Batch.id).where(Batch.id == batch_id).with_for_update())
    pending = session.scalar(
        select(exists().where(Recipient.batch_id == batch_id, Recipient.status.in_(IN_FLIGHT)))
    )
    if pending:
        return False
    return transition_batch(
        session=session,
        batch_id=batch_id,
        to=ended_as(session=session, batch_id=batch_id),
        values={"completed_at": now},
        at=now,
    )


def ended_as(*, session: Session, batch_id: str) -> BatchStatus:
    """How a batch with nothing in flight ends: by what its recipients say, not by who
    (the worker's record or the expiry sweep) gets there first.

    Expired exactly when expire_at stopped one of them from being handed over: expired
    with no message a provider accepted (``sent_at`` is kept by a receipt, cleared by a
    late fallback); otherwise completed. A message that a receipt expires after its
    carrier accepted it does not count: that receipt may come before or after the end.
    """
    stopped = session.scalar(
        select(
            exists().where(
                Recipient.batch_id == batch_id,
                Recipient.status == RecipientStatus.EXPIRED,
                Recipient.sent_at.is_(None),
            )
        )
    )
    return BatchStatus.EXPIRED if stopped else BatchStatus.COMPLETED


def expire_due(*, session: Session, now: datetime, limit: int = 200) -> int:
    """Expire what is still waiting past its batch's expire_at; returns recipients expired."""
    batches = session.scalars(
        select(Batch)
        .where(
            Batch.status.in_((BatchStatus.SCHEDULED, BatchStatus.QUEUED, BatchStatus.SENDING)),
            Batch.expire_at <= now,
        )
        .limit(limit)
    ).all()
    # Taken one by one in id order, as a late fallback takes several: whatever order the
    # read's plan gives would deadlock with another taker of several (PostgreSQL).
    batches = sorted(batches, key=attrgetter("id"))
    total = sum(expire_batch(session=session, batch=batch, now=now) for batch in batches)
    session.flush()
    return total


def expire_batch(*, session: Session, batch: Batch, now: datetime) -> int:
    """Expire a batch past its expire_at: its waiting recipients now, the batch itself once
    none is out with a worker; returns recipients expired."""
    # The batch row first, as cancel takes it: recipients first, the two deadlocked
    # (PostgreSQL), each waiting for the rows the other had changed.
    session.execute(select(Batch.id).where(Batch.id == batch.id).with_for_update())
    expired = expire_recipients(session=session, batch=batch, now=now)
    # Ended as the worker's record would end it: completed if nothing was stopped.
    complete_if_done(session=session, batch_id=batch.id, now=now)
    return expired


def expire_recipients(*, session: Session, batch: Batch, now: datetime) -> int:
    """Move the batch's waiting recipients to expired, with their events."""
    moved = transition_recipients(
        session=session,
        to=RecipientStatus.EXPIRED,
        current=(RecipientStatus.SCHEDULED, RecipientStatus.QUEUED),
        where=[Recipient.batch_id == batch.id],
        values={
            "error_code": "expired",
            "error_text": "expire_at passed before the message could be sent",
        },
        at=now,
        batch=batch,
    )
    return len(moved)
