"""The Celery app factory: broker settings, routes, beat schedule, the runtime hook."""

from __future__ import annotations

import gc
from datetime import UTC
from typing import Any

from celery import Celery
from celery.signals import beat_init, worker_init, worker_process_init, worker_process_shutdown
from sqlalchemy.engine import make_url

from dispatcher import outbox, priority
from dispatcher.channels import registry
from dispatcher.config import Settings
from dispatcher.outbox import TaskName
from dispatcher.runtime import Runtime
from dispatcher.webhooks import delivery
from workers import telemetry
from workers.heartbeat import Heartbeat


class CeleryPublisher:
    """Publishes outbox messages as Celery tasks by name (no task imports needed)."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def publish(self, messages: list[outbox.Message | outbox.Revoke]) -> None:
        with self.app.producer_or_acquire() as producer:
            for m in messages:
                if isinstance(m, outbox.Revoke):
                    self.app.control.revoke(list(m.task_ids))
                    continue
                self.app.send_task(
                    m.task.value,
                    kwargs=m.kwargs,
                    eta=m.eta.replace(tzinfo=UTC) if m.eta else None,
                    expires=m.expires,
                    queue=outbox.queue_for(m.task).value,
                    task_id=outbox.task_id_for(m),
                    producer=producer,
                )


def settle_gc() -> None:
    """Freeze what start-up allocated and collect young objects less often (a worker's start).

    A worker holds tens of thousands of long-lived objects (the app, SQLAlchemy's
    compiled statements), and every older-generation collection walked them all
    while a send task allocates a few objects per recipient. Frozen, they are no
    longer scanned, and a forked pool process keeps sharing their pages.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


def preload_driver(settings: Settings) -> None:
    """Import the database driver in a worker's main process, before its pool forks.

    SQLAlchemy imports it with the first connection: in every pool child, on its
    first task, that cost 0.2 s of CPU (psycopg and its adapters).
    """
    make_url(settings.database_url).get_dialect().import_dbapi()


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The periodic tasks; each expires, so a queue nobody consumes does not pile them up."""
    every = {
        TaskName.PROMOTE_DUE: settings.scheduler_interval,
        TaskName.PROMOTE_CALLBACKS: settings.scheduler_interval,
        TaskName.RECLAIM_STALE: max(5.0, settings.send_lease / 4),
        TaskName.EXPIRE_DUE: 30.0,
        TaskName.SIMULATOR_RECEIPTS: 1.0,
        TaskName.SWEEP_RECEIPTS: 5.0,
        TaskName.PURGE_RETENTION: settings.retention_interval,
    }
    if not registry.HOLD_RECEIPTS & set(registry.selected(settings).values()):
        # No channel's receipts wait in Redis: a run every second would find none.
        del every[TaskName.SIMULATOR_RECEIPTS]
    return {
        name.value.replace("_", "-"): {
            "task": name.value,
            "schedule": interval,
            # A run still queued after this long is dropped: a newer one does its work.
            "options": {"expires": max(settings.periodic_expires, interval)},
        }
        for name, interval in every.items()
    }


def create_celery(settings: Settings | None = None) -> Celery:
    """A configured Celery app with the Dispatcher runtime attached as ``app.runtime``."""
    settings = settings or Settings.from_env()
    app = Celery("dispatcher", broker=settings.redis_url, include=["workers.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        enable_utc=True,
        timezone="UTC",
        # A task is acknowledged only when done; a killed worker's task is redelivered
        # (and dead-lettered by the task base after settings.dead_letter_after deaths).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Every task is bounded; Settings checks that the hard limit (plus the ETA wait
        # and a rate-limited chunk's slice) stays below the visibility timeout.
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        task_default_queue=outbox.QueueName.DISPATCH.value,
        task_routes={name.value: {"queue": queue.value} for name, queue in outbox.QUEUES.items()},
        # Must exceed the scheduling horizon: Redis re-delivers older unacked ETA tasks.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        beat_schedule=beat_schedule(settings),
    )
    runtime = Runtime(settings, CeleryPublisher(app))
    app.runtime = runtime
    telemetry.install(app, settings)
    app.steps["consumer"].add(Heartbeat)  # /health/ready's sign of life

    @worker_init.connect(weak=False)
    def _before_fork(sender: Any, **_: Any) -> None:
        # The main process, before the pool forks: the children inherit the modules
        # and the niceness of the role its queues (-Q, already selected) give it.
        if sender.app is app:
            role = priority.role_of_queues(app.amqp.queues.consume_from, settings.process_nice)
            priority.apply(role, settings.process_nice)
        preload_driver(settings)

    @beat_init.connect(weak=False)
    def _beat_starts(sender: Any, **_: Any) -> None:
        if sender.app is app:
            priority.apply("beat", settings.process_nice)

    @worker_process_init.connect(weak=False)
    def _after_fork(**_: Any) -> None:
        # A forked pool process must not share the parent's sockets.
        runtime.reset_after_fork()
        settle_gc()

    @worker_process_shutdown.connect(weak=False, dispatch_uid="dispatcher_drain_callbacks")
    def _before_exit(**_: Any) -> None:
        # A pool process leaving (Celery's warm shutdown closes the pool once its tasks
        # are done): its callback lanes may still have POSTs in flight. Let them finish
        # and record them, or they stay 'delivering' until the lease and go out again.
        delivery.drain()

    return app
