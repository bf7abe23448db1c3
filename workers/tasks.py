"""Tasks: thin adapters that take ids, call one service, and commit.

Each task is idempotent (conditional updates decide every state change), so a
redelivered or duplicated task does no harm. Database and Redis hiccups are
retried with a bound; business rules live in the services, not here.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from celery import Task, shared_task
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from dispatcher import health, metrics, retention
from dispatcher.db import transaction, utcnow
from dispatcher.engine import scheduling, sending
from dispatcher.outbox import QueueName, TaskName
from dispatcher.receipts import service as receipts
from dispatcher.runtime import Runtime
from dispatcher.webhooks import delivery
from dispatcher.webhooks import scheduling as callback_scheduling
from workers import deadletter

log = logging.getLogger(__name__)
RETRYABLE = (OperationalError, redis.ConnectionError, redis.TimeoutError)
F = TypeVar("F", bound=Callable[..., Any])


class DispatcherTask(Task):
    """Base task: the runtime, bounded retries of transient errors, poison-message guard."""

    autoretry_for = RETRYABLE
    max_retries = 5
    retry_backoff = 2
    retry_backoff_max = 60
    retry_jitter = True

    @property
    def runtime(self) -> Runtime:
        return self.app.runtime

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rt = self.runtime
        task_id = self.request.id
        if not task_id:  # called directly, not delivered by a worker
            return super().__call__(*args, **kwargs)
        ttl = 2 * rt.settings.visibility_timeout
        try:
            deliveries = deadletter.count_delivery(rt.redis, task_id, ttl=ttl)
        except redis.RedisError:
            # Counting is a safeguard; without Redis the task still runs.
            log.warning("could not count deliveries of %s[%s]", self.name, task_id, exc_info=True)
            return super().__call__(*args, **kwargs)
        if deliveries > rt.settings.dead_letter_after:
            # Acknowledged without running: the deliveries before this one all died.
            deadletter.dead_letter(
                rt.redis,
                task=self.name,
                task_id=task_id,
                args=list(args),
                kwargs=kwargs,
                deliveries=deliveries - 1,
            )
            return None
        try:
            return super().__call__(*args, **kwargs)
        finally:
            try:
                deadletter.finished(rt.redis, task_id)
            except redis.RedisError:
                # The task's own outcome stands (its work is done, or its error is the
                # one to report); the count expires with its TTL.
                log.warning("could not clear the deliveries of %s[%s]", self.name, task_id)


class TransactionTask(DispatcherTask):
    """A task whose body is one transaction: the base opens it, passes the session, commits.

    The body is ``body(self, session, **kwargs)``; a retry of a transient error
    reruns the whole transaction (the retry wraps the transaction, not the other way).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> TransactionTask:
        obj = super().__new__(cls, *args, **kwargs)
        # Calls (delay, apply) are checked against the body's signature: the session
        # is ours to give, so it is filled in for the check.
        if getattr(obj, "__header__", None) is not None:
            obj.__header__ = functools.partial(obj.__header__, object())
        body = obj.run

        @functools.wraps(body)
        def run(*args: Any, **kwargs: Any) -> Any:
            with transaction(obj.runtime.sessions) as session:
                return body(session, *args, **kwargs)

        obj.run = run
        return obj


def task(name: TaskName, *, base: type[DispatcherTask] = DispatcherTask) -> Callable[[F], F]:
    """Register a task under its typed name."""
    return shared_task(base=base, bind=True, name=name.value)


def transactional(name: TaskName) -> Callable[[F], F]:
    """Register a one-transaction task (see TransactionTask)."""
    return task(name, base=TransactionTask)


@transactional(TaskName.DISPATCH_BATCH)
def dispatch_batch(self: DispatcherTask, session: Session, batch_id: str) -> int:
    return scheduling.dispatch_batch(
        session=session, settings=self.runtime.settings, batch_id=batch_id, now=utcnow()
    )


def _send(rt: Runtime, *, batch_id: str, **which: Any) -> dict[str, Any]:
    """One send task: a chunk's seq range or a list of recipient ids."""
    return sending.send_recipients(
        factory=rt.sessions,
        settings=rt.settings,
        providers=rt.providers,
        limiter=rt.limiter,
        batch_id=batch_id,
        backpressure=rt.backpressure,
        **which,
    ).as_dict()


@task(TaskName.SEND_CHUNK)
def send_chunk(self: DispatcherTask, batch_id: str, start: int, end: int) -> dict[str, Any]:
    return _send(self.runtime, batch_id=batch_id, seq_range=(start, end))


@task(TaskName.SEND_RECIPIENTS)
def send_recipients(
    self: DispatcherTask, batch_id: str, recipient_ids: list[str]
) -> dict[str, Any]:
    return _send(self.runtime, batch_id=batch_id, recipient_ids=recipient_ids)


@transactional(TaskName.PROMOTE_DUE)
def promote_due(self: DispatcherTask, session: Session) -> int:
    rt = self.runtime
    # Published again only while both queues have a consumer (see scheduling.promote_due).
    queues = (QueueName.DISPATCH, QueueName.SEND)
    consumed = (health.consumed(client=rt.redis, queue=q.value) for q in queues)
    return scheduling.promote_due(
        session=session, settings=rt.settings, now=utcnow(), requeue=all(consumed)
    )


@transactional(TaskName.RECLAIM_STALE)
def reclaim_stale(self: DispatcherTask, session: Session) -> dict[str, int]:
    rt = self.runtime
    return sending.reclaim_stale(
        session=session, settings=rt.settings, providers=rt.providers, now=utcnow()
    )


@transactional(TaskName.EXPIRE_DUE)
def expire_due(self: DispatcherTask, session: Session) -> int:
    return scheduling.expire_due(session=session, now=utcnow())


# A run takes what is due claim after claim (each one transaction, at most a provider's
# claim limit) for this long: a burst larger than one claim is not left for the next run.
RECEIPTS_BUDGET = 2.0
# A receipt that found its message not yet sent is stored; the record applies it, unless
# the two committed together (PostgreSQL): the sweep looks again this much later.
LATE_RECHECK = 1.0


@task(TaskName.SIMULATOR_RECEIPTS)
def simulator_receipts(self: DispatcherTask) -> dict[str, int]:
    """Apply the receipts providers hold in Redis: the simulator's due ones, the SMPP
    connector's (it reads them; applying them here keeps the database out of its loop)."""
    rt = self.runtime
    done: Counter[str] = Counter()
    for provider in {p.name: p for p in rt.providers.values()}.values():
        if not hasattr(provider, "due_receipts"):
            continue
        until = time.monotonic() + RECEIPTS_BUDGET
        while due := provider.due_receipts():
            done.update(_apply_receipts(rt, provider, due))
            if time.monotonic() > until:
                break
    if done["pending"]:
        rt.receipt_waker.at(time.time() + LATE_RECHECK, task=TaskName.SWEEP_RECEIPTS)
    return dict(done)


def _apply_receipts(rt: Runtime, provider: Any, due: list[Any]) -> dict[str, int]:
    """Apply one claim of ``provider``'s receipts; give them all back if that fails."""
    try:
        counts = _accept(rt, provider.name, due)
    except Exception:
        if hasattr(provider, "requeue_receipts"):
            provider.requeue_receipts(due)
        raise
    if hasattr(provider, "receipts_applied"):
        provider.receipts_applied()  # committed: the provider's claim on them can go
    return counts


# What a database answers to a value no column takes (or a constraint it breaks): the
# receipt's content, unlike a lost connection or a lock, which the next run gets past.
_REFUSED = (DataError, IntegrityError)


def _accept(rt: Runtime, provider: str, due: list[Any]) -> dict[str, int]:
    """Apply ``due`` in one transaction or, if the database refuses it, one receipt a
    transaction, dropping (and logging) those it refuses alone.

    A claim that failed goes back ahead of the rest, so one receipt the database cannot
    store would otherwise fail every run after it, and no receipt would be applied. If it
    refuses every one, the fault is not theirs: the error stands and all go back.
    """

    def apply(group: list[Any]) -> dict[str, int]:
        with transaction(rt.sessions) as session:
            return receipts.accept(
                session=session, provider=provider, receipts=group, now=utcnow()
            ).as_dict()

    try:
        return apply(due)
    except _REFUSED:
        if len(due) == 1:
            raise
    counts: Counter[str] = Counter()
    refused: list[tuple[Any, Exception]] = []
    for receipt in due:
        try:
            counts.update(apply([receipt]))
        except _REFUSED as exc:
            refused.append((receipt, exc))
    if len(refused) == len(due):
        raise refused[-1][1]
    for receipt, error in refused:
        log.error("%s receipt dropped, the database refuses it: %r (%s)", provider, receipt, error)
    counts["refused"] = len(refused)
    metrics.receipts("refused", len(refused))
    return dict(counts)


@transactional(TaskName.SWEEP_RECEIPTS)
def sweep_receipts(self: DispatcherTask, session: Session) -> dict[str, int]:
    return receipts.sweep(session=session, settings=self.runtime.settings, now=utcnow()).as_dict()


@task(TaskName.DELIVER_CALLBACKS)
def deliver_callbacks(self: DispatcherTask, callback_ids: list[str]) -> dict[str, int]:
    rt = self.runtime
    return delivery.deliver(
        factory=rt.sessions,
        settings=rt.settings,
        sender=rt.webhook_sender,
        gate=delivery.gate_for(redis_client=rt.redis, settings=rt.settings),
        callback_ids=callback_ids,
    )


@transactional(TaskName.PROMOTE_CALLBACKS)
def promote_callbacks(self: DispatcherTask, session: Session) -> int:
    rt = self.runtime
    return callback_scheduling.promote_due(
        session=session,
        settings=rt.settings,
        now=utcnow(),
        gate=delivery.gate_for(redis_client=rt.redis, settings=rt.settings),
        requeue=health.consumed(client=rt.redis, queue=QueueName.CALLBACKS.value),
    )


@task(TaskName.PURGE_RETENTION)
def purge_retention(self: DispatcherTask) -> dict[str, int]:
    rt = self.runtime
    return retention.purge(factory=rt.sessions, settings=rt.settings, now=utcnow()).as_dict()
