"""When callbacks go out: publishing due ones, and reclaiming claims whose worker died.

Retry times are the ``next_attempt_at`` column, never long Celery countdowns: the
scheduler's ``promote_callbacks`` task publishes what is due within the horizon.
While a row is ``delivering``, ``next_attempt_at`` holds the moment it was claimed:
the lease start used here to reclaim rows whose worker died mid-POST.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Executable, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from dispatcher import outbox
from dispatcher.config import Settings
from dispatcher.states import CALLBACK_TRANSITIONS, CallbackState
from dispatcher.webhooks.limits import EndpointGate, endpoint_key
from dispatcher.webhooks.models import Callback

__all__ = ["TASK", "delivery_lease", "promote_due", "publish"]

TASK = outbox.TaskName.DELIVER_CALLBACKS
# Floor of the lease after which a 'delivering' row is presumed orphaned.
MIN_LEASE = 300.0

S = CallbackState


def sources(new: CallbackState) -> tuple[str, ...]:
    """The states a callback may move to ``new`` from (for conditional updates)."""
    return tuple(s.value for s, nxt in CALLBACK_TRANSITIONS.items() if new in nxt)


def chunks(items: Sequence[str], size: int) -> list[list[str]]:
    """``items`` cut into lists of at most ``size``."""
    size = max(1, size)
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def by_id(column: ColumnElement[str] | InstrumentedAttribute[str]) -> ColumnElement[str]:
    """``column`` in a form no index serves, for conditions beside ``id IN (...)``.

    Without statistics SQLite prefers the (state, next_attempt_at) index to the
    primary key for ``id IN (...) AND state = ...``: it would walk every callback in
    that state (a whole backlog) to update a few hundred.
    """
    return column.concat("")


def count(session: Session, statement: Executable) -> int:
    """Execute an UPDATE and return how many rows it changed."""
    # On the connection: a bulk UPDATE needs none of the ORM's per-statement work.
    return int(cast(CursorResult[Any], session.connection().execute(statement)).rowcount)


def delivery_lease(settings: Settings) -> timedelta:
    """How long a claim lasts before promote_due presumes the worker died."""
    # One POST is bounded by the sender's timeouts (connect, status line, a few
    # capped body reads), and a lane stops taking callbacks after LANE_BUDGET; the
    # lease stays well above both so a slow but live worker is never overtaken.
    worst = 10 * (settings.callback_connect_timeout + settings.callback_read_timeout)
    return timedelta(seconds=max(MIN_LEASE, worst))


def publish(
    session: Session, ids: Sequence[str], *, size: int, eta: datetime | None = None
) -> None:
    """Defer deliver tasks for ``ids`` (published after commit), ``size`` per task."""
    for group in chunks(ids, size):
        outbox.defer(session, outbox.Message(TASK, {"callback_ids": group}, eta=eta))


def promote_due(
    *,
    session: Session,
    settings: Settings,
    now: datetime,
    gate: EndpointGate | None = None,
    limit: int = 5000,
    requeue: bool = True,
) -> int:
    """Reclaim orphaned claims, then publish callbacks due within the horizon (or lost).

    With a ``gate``, due callbacks of an endpoint its breaker holds, or whose slots are
    all taken, are moved on in the database instead of published: a held endpoint's
    backlog never floods the queue that every tenant's callbacks share.

    ``requeue``: also publish again what was published ``callback_requeue_after`` ago
    and is still pending (a publish lost after commit). False while no worker consumes
    the callbacks queue: those tasks are still in it, and publishing them again every
    interval would add a copy of each to the queue per interval for as long as the
    workers are away.
    """
    _reclaim_stale(session=session, settings=settings, now=now)
    horizon = now + timedelta(seconds=settings.schedule_horizon)
    unpublished: ColumnElement[bool] = Callback.enqueued_at.is_(None)
    if requeue:
        lost = now - timedelta(seconds=settings.callback_requeue_after)
        unpublished = unpublished | (Callback.enqueued_at < lost)
    rows = session.execute(
        select(Callback.id, Callback.next_attempt_at, Callback.account_id, Callback.url)
        .where(
            Callback.state == S.PENDING,
            Callback.next_attempt_at <= horizon,
            unpublished,
        )
        .order_by(Callback.next_attempt_at, Callback.created_at)
        .limit(limit)
    ).all()
    if not rows:
        return 0
    if gate is not None:
        rows = _hold_back(
            session=session, gate=gate, rows=rows, now=now, slow=settings.callback_task_wait
        )
        if not rows:
            session.flush()
            return 0
    stamped: set[str] = set()
    for ids in chunks([r.id for r in rows], 500):
        # Only rows still pending that no transaction holds. One a deliver task claimed
        # since the read is that task's: stamped by id alone it was published twice, and
        # locked until this sweep's commit, the task's record of its POST waited for it
        # (PostgreSQL). One held is left to the next run.
        free = (
            select(Callback.id)
            .where(Callback.id.in_(ids), Callback.state == S.PENDING)
            .with_for_update(skip_locked=True)
        )
        stamped.update(
            session.scalars(
                update(Callback)
                .where(Callback.id.in_(free))
                .values(enqueued_at=now)
                .returning(Callback.id)
                .execution_options(synchronize_session=False)
            )
        )
    rows = [r for r in rows if r.id in stamped]
    publish(
        session, [r.id for r in rows if r.next_attempt_at <= now], size=settings.callback_batch_size
    )
    # Future retries share one task per whole second: the ETA is the second rounded
    # up, so every callback in the group is due by the time the task runs.
    later: dict[datetime, list[str]] = {}
    for r in rows:
        if r.next_attempt_at > now:
            later.setdefault(_ceil_second(r.next_attempt_at), []).append(r.id)
    for eta, group in later.items():
        publish(session, group, size=settings.callback_batch_size, eta=eta)
    session.flush()
    return len(rows)


def _hold_back(
    *, session: Session, gate: EndpointGate, rows: Sequence[Any], now: datetime, slow: float
) -> list[Any]:
    """Move due callbacks of held or slow endpoints on; returns the rows to publish.

    Slow: every slot taken, the oldest for at least ``slow`` seconds. An endpoint whose
    slots are all taken by quick POSTs is merely busy: its callbacks go out.
    """
    by_key: dict[str, list[Any]] = {}
    for r in rows:
        if r.next_attempt_at <= now:
            by_key.setdefault(endpoint_key(r.account_id, r.url), []).append(r)
    held: set[str] = set()
    for key, group in by_key.items():
        wait, busy = gate.held_for(key)
        # Slow: hold them back about as long as the slots have been busy, so a slow
        # endpoint's backlog is looked at less and less often.
        delay = wait or (min(busy, 15.0) if busy >= slow else 0.0)
        if not delay:
            continue
        ids = [r.id for r in group]
        held.update(ids)
        for part in chunks(ids, 500):
            session.execute(
                update(Callback)
                .where(Callback.id.in_(part), Callback.state == S.PENDING)
                .values(next_attempt_at=now + timedelta(seconds=delay), enqueued_at=None)
                .execution_options(synchronize_session=False)
            )
    return [r for r in rows if r.id not in held]


def _ceil_second(at: datetime) -> datetime:
    """``at`` rounded up to a whole second."""
    whole = at.replace(microsecond=0)
    return whole if whole == at else whole + timedelta(seconds=1)


def _reclaim_stale(*, session: Session, settings: Settings, now: datetime) -> int:
    """Return 'delivering' rows past their lease to pending (or dead once out of retries)."""
    cutoff = now - delivery_lease(settings)
    stale = (
        Callback.state == S.DELIVERING,
        Callback.next_attempt_at < cutoff,
    )
    error = "worker lost during delivery; the receiver may have seen this webhook-id"
    # A callback that keeps killing its worker must still run out of attempts.
    out_of_tries = Callback.attempts > len(settings.callback_retry_schedule)
    dead = count(
        session,
        update(Callback)
        .where(*stale, out_of_tries)
        .values(state=S.DEAD, last_error=error)
        .execution_options(synchronize_session=False),
    )
    retried = count(
        session,
        update(Callback)
        .where(*stale)
        .values(state=S.PENDING, next_attempt_at=now, enqueued_at=None, last_error=error)
        .execution_options(synchronize_session=False),
    )
    return dead + retried
