"""The Celery app factory: broker settings, routes, beat schedule, the runtime hook."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from dispatcher import outbox
from dispatcher.config import Settings
from dispatcher.runtime import Runtime
from workers import telemetry

QUEUES = {
    "dispatch_batch": "dispatch",
    "send_chunk": "send",
    "send_recipients": "send",
    "deliver_callbacks": "callbacks",
    "promote_due": "dispatch",
    "reclaim_stale": "dispatch",
    "expire_due": "dispatch",
    "simulator_receipts": "dispatch",
    "sweep_receipts": "dispatch",
    "promote_callbacks": "callbacks",
    "purge_retention": "dispatch",
}


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
                    m.task,
                    kwargs=m.kwargs,
                    eta=m.eta.replace(tzinfo=UTC) if m.eta else None,
                    queue=QUEUES.get(m.task, "dispatch"),
                    task_id=outbox.task_id_for(m),
                    producer=producer,
                )


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
        # A task is acknowledged only when done; a killed worker's task is redelivered.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue="dispatch",
        task_routes={name: {"queue": queue} for name, queue in QUEUES.items()},
        # Must exceed the scheduling horizon: Redis re-delivers older unacked ETA tasks.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        beat_schedule={
            "promote-due": {"task": "promote_due", "schedule": settings.scheduler_interval},
            "promote-callbacks": {
                "task": "promote_callbacks",
                "schedule": settings.scheduler_interval,
            },
            "reclaim-stale": {
                "task": "reclaim_stale",
                "schedule": max(5.0, settings.send_lease / 4),
            },
            "expire-due": {"task": "expire_due", "schedule": 30.0},
            "simulator-receipts": {"task": "simulator_receipts", "schedule": 1.0},
            "purge-retention": {
                "task": "purge_retention",
                "schedule": settings.retention_interval,
            },
            "sweep-receipts": {"task": "sweep_receipts", "schedule": 5.0},
        },
    )
    runtime = Runtime(settings, CeleryPublisher(app))
    app.runtime = runtime
    telemetry.install(app, settings)

    @worker_process_init.connect(weak=False)
    def _after_fork(**_: Any) -> None:
        # A forked pool process must not share the parent's sockets.
        runtime.dispose()
        for name in ("engine", "sessions", "redis", "limiter", "providers", "webhook_sender"):
            runtime.__dict__.pop(name, None)

    return app
