"""How far behind the system is: oldest due work, dead letters, rates and the biggest backlogs.

Read by the metrics collector at scrape time and by ``dispatcher status``;
every query here is served by an index (status/state + time) so it stays
cheap on a large table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.orm import Session

from dispatcher.batches.models import Batch, Recipient, StatusEvent
from dispatcher.states import OPEN_BATCH, BatchStatus, CallbackState, RecipientStatus
from dispatcher.webhooks.models import Callback, Endpoint

B, R, C = BatchStatus, RecipientStatus, CallbackState


@dataclass(frozen=True)
class Snapshot:
    oldest_due_recipient_age: float
    oldest_due_callback_age: float
    dead_callbacks: int
    held_callbacks: int
    disabled_endpoints: int
    # The dispatch queue's share of the first: a due batch not fanned out yet.
    oldest_undispatched_batch_age: float = 0.0


def _age(now: datetime, since: datetime | None) -> float:
    return max(0.0, (now - since).total_seconds()) if since else 0.0


def oldest_due_recipient(*, session: Session, now: datetime) -> datetime | None:
    """When the longest-waiting recipient that should have been sent by now became due."""
    return _oldest_due(session=session, now=now)[0]


def _oldest_due(*, session: Session, now: datetime) -> tuple[datetime | None, datetime | None]:
    """When the longest-waiting due recipient became due, and the oldest due batch not
    yet dispatched (whose recipients have all been due since its send_at)."""
    waiting_batch = session.scalar(
        select(func.min(Batch.send_at)).where(
            Batch.status.in_((B.SCHEDULED, B.QUEUED)), Batch.send_at <= now
        )
    )
    # A retry whose time has come (index on status, next_attempt_at).
    retry = session.scalar(
        select(func.min(Recipient.next_attempt_at)).where(
            Recipient.status == R.QUEUED, Recipient.next_attempt_at <= now
        )
    )
    # A sending batch's recipients still waiting for their first hand-off.
    first = session.scalar(
        select(func.min(Batch.send_at)).where(
            Batch.status == B.SENDING,
            Batch.send_at <= now,
            exists().where(
                Recipient.batch_id == Batch.id,
                Recipient.status == R.QUEUED,
                Recipient.next_attempt_at.is_(None),
            ),
        )
    )
    found = [t for t in (waiting_batch, retry, first) if t is not None]
    return (min(found) if found else None), waiting_batch


def snapshot(*, session: Session, now: datetime) -> Snapshot:
    """The scrape-time gauges in one read."""
    callback = session.scalar(
        select(func.min(Callback.next_attempt_at)).where(
            Callback.state == C.PENDING, Callback.next_attempt_at <= now
        )
    )
    counts = dict(
        session.execute(
            select(Callback.state, func.count())
            .where(Callback.state.in_((C.DEAD, C.HELD)))
            .group_by(Callback.state)
        ).all()
    )
    disabled = session.scalar(
        select(func.count()).select_from(Endpoint).where(Endpoint.disabled_at.is_not(None))
    )
    recipient, undispatched = _oldest_due(session=session, now=now)
    return Snapshot(
        oldest_due_recipient_age=_age(now, recipient),
        oldest_due_callback_age=_age(now, callback),
        dead_callbacks=int(counts.get(C.DEAD, 0)),
        held_callbacks=int(counts.get(C.HELD, 0)),
        disabled_endpoints=int(disabled or 0),
        oldest_undispatched_batch_age=_age(now, undispatched),
    )


def rates(
    *, session: Session, now: datetime, window: float = 60.0, cap: int = 200_000
) -> dict[str, float]:
    """Sends and callback deliveries per second over the last ``window`` seconds."""
    since = now - timedelta(seconds=window)
    # The newest events by primary key (insertion order), so the scan stops early
    # on a large table; ``cap`` bounds it at rates far above one machine's.
    recent = (
        select(StatusEvent.status, StatusEvent.at)
        .order_by(StatusEvent.id.desc())
        .limit(cap)
        .subquery()
    )
    sent = session.scalar(
        select(func.count())
        .select_from(recent)
        .where(recent.c.status == R.SENT, recent.c.at > since)
    )
    delivered = session.scalar(
        select(func.count())
        .select_from(Callback)
        .where(Callback.state == C.DELIVERED, Callback.delivered_at > since)
    )
    return {"sends": (sent or 0) / window, "callbacks": (delivered or 0) / window}


def largest_backlogs(*, session: Session, now: datetime, limit: int = 5) -> list[tuple[str, int]]:
    """Accounts with the most due, unsent recipients: (account id, count), largest first."""
    due = or_(
        Batch.status.in_((B.SCHEDULED, B.QUEUED)),
        and_(Batch.status == B.SENDING, Recipient.status == R.QUEUED),
    )
    rows = session.execute(
        select(Batch.account_id, func.count())
        .select_from(Recipient)
        .join(Batch, Batch.id == Recipient.batch_id)
        .where(
            Batch.send_at <= now,
            Recipient.status.in_((R.SCHEDULED, R.QUEUED)),
            due,
        )
        .group_by(Batch.account_id)
        .order_by(func.count().desc())
        .limit(limit)
    ).all()
    return [(str(a), int(n)) for a, n in rows]


@dataclass(frozen=True)
class Progress:
    """One batch's state and its recipients per status, for the CLI."""

    batch_id: str
    account_id: str
    status: str
    send_at: datetime
    total: int
    counts: dict[str, int]

    @property
    def done(self) -> int:
        """Recipients no worker will touch again (sent ones only wait for a receipt)."""
        return self.total - sum(self.counts.get(s, 0) for s in PENDING)

    @property
    def final(self) -> bool:
        """The batch is closed and no recipient waits to be sent."""
        return self.status not in {s.value for s in OPEN_BATCH} and self.done == self.total


# Recipients still to be handed over.
PENDING = (R.SCHEDULED.value, R.QUEUED.value, R.SENDING.value)


def progress(*, session: Session, batch_id: str) -> Progress | None:
    """A batch's progress by our id (any account: this is the operator's view)."""
    batch = session.get(Batch, batch_id)
    if batch is None:
        return None
    counts = {s.value: 0 for s in R}
    for status, n in session.execute(
        select(Recipient.status, func.count())
        .where(Recipient.batch_id == batch.id)
        .group_by(Recipient.status)
    ):
        counts[R(status).value] = int(n)
    return Progress(
        batch_id=batch.id,
        account_id=batch.account_id,
        status=B(batch.status).value,
        send_at=batch.send_at,
        total=sum(counts.values()),
        counts=counts,
    )
