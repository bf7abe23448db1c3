"""Tasks: thin adapters that take ids, call one service, and commit.

Each task is idempotent (conditional updates decide every state change), so a
redelivered or duplicated task does no harm. Database and Redis hiccups are
retried with a bound; business rules live in the services, not here.
"""

from __future__ import annotations

from typing import Any

import redis
from celery import Task, shared_task
from sqlalchemy.exc import OperationalError

from dispatcher import retention
from dispatcher.db import transaction, utcnow
from dispatcher.engine import scheduling, sending
from dispatcher.receipts import service as receipts
from dispatcher.runtime import Runtime
from dispatcher.webhooks import delivery
from dispatcher.webhooks import scheduling as callback_scheduling

RETRYABLE = (OperationalError, redis.ConnectionError, redis.TimeoutError)


class DispatcherTask(Task):
    """Base task: gives access to the runtime and retries transient infrastructure errors."""

    autoretry_for = RETRYABLE
    max_retries = 5
    retry_backoff = 2
    retry_backoff_max = 60
    retry_jitter = True

    @property
    def runtime(self) -> Runtime:
        return self.app.runtime


def task(**options: Any) -> Any:
    return shared_task(base=DispatcherTask, bind=True, **options)


@task(name="dispatch_batch")
def dispatch_batch(self: DispatcherTask, batch_id: str) -> int:
    rt = self.runtime
    with transaction(rt.sessions) as session:
        return scheduling.dispatch_batch(
            session=session, settings=rt.settings, batch_id=batch_id, now=utcnow()
        )


@task(name="send_chunk")
def send_chunk(self: DispatcherTask, batch_id: str, start: int, end: int) -> dict[str, Any]:
    rt = self.runtime
    return sending.send_recipients(
        factory=rt.sessions,
        settings=rt.settings,
        providers=rt.providers,
        limiter=rt.limiter,
        batch_id=batch_id,
        seq_range=(start, end),
    ).as_dict()


@task(name="send_recipients")
def send_recipients(
    self: DispatcherTask, batch_id: str, recipient_ids: list[str]
) -> dict[str, Any]:
    rt = self.runtime
    return sending.send_recipients(
        factory=rt.sessions,
        settings=rt.settings,
        providers=rt.providers,
        limiter=rt.limiter,
        batch_id=batch_id,
        recipient_ids=recipient_ids,
    ).as_dict()


@task(name="promote_due")
def promote_due(self: DispatcherTask) -> int:
    rt = self.runtime
    with transaction(rt.sessions) as session:
        return scheduling.promote_due(session=session, settings=rt.settings, now=utcnow())


@task(name="reclaim_stale")
def reclaim_stale(self: DispatcherTask) -> dict[str, int]:
    rt = self.runtime
    with transaction(rt.sessions) as session:
        return sending.reclaim_stale(
            session=session, settings=rt.settings, providers=rt.providers, now=utcnow()
        )


@task(name="expire_due")
def expire_due(self: DispatcherTask) -> int:
    rt = self.runtime
    with transaction(rt.sessions) as session:
        return scheduling.expire_due(session=session, now=utcnow())


@task(name="simulator_receipts")
def simulator_receipts(self: DispatcherTask) -> dict[str, int]:
    rt = self.runtime
    simulator = next((p for p in rt.providers.values() if p.name == "simulator"), None)
    if simulator is None:
        return {}
    due = simulator.due_receipts()  # type: ignore[attr-defined]
    if not due:
        return {}
    with transaction(rt.sessions) as session:
        return receipts.accept(
            session=session, provider=simulator.name, receipts=due, now=utcnow()
        ).as_dict()


@task(name="sweep_receipts")
def sweep_receipts(self: DispatcherTask) -> dict[str, int]:
    rt = self.runtime
    with transaction(rt.sessions) as session:
        return receipts.sweep(session=session, settings=rt.settings, now=utcnow()).as_dict()


@task(name="deliver_callbacks")
def deliver_callbacks(self: DispatcherTask, callback_ids: list[str]) -> dict[str, int]:
    rt = self.runtime
    return delivery.deliver(
        factory=rt.sessions,
        settings=rt.settings,
        sender=rt.webhook_sender,
        gate=delivery.gate_for(redis_client=rt.redis, settings=rt.settings),
        callback_ids=callback_ids,
    )


@task(name="promote_callbacks")
def promote_callbacks(self: DispatcherTask) -> int:
    rt = self.runtime
    with transaction(rt.sessions) as session:
        return callback_scheduling.promote_due(
            session=session,
            settings=rt.settings,
            now=utcnow(),
            gate=delivery.gate_for(redis_client=rt.redis, settings=rt.settings),
        )


@task(name="purge_retention")
def purge_retention(self: DispatcherTask) -> dict[str, int]:
    rt = self.runtime
    return retention.purge(factory=rt.sessions, settings=rt.settings, now=utcnow()).as_dict()
