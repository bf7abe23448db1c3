"""Metrics, logs and Sentry for Celery processes (wired by the app factory)."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import (
    setup_logging,
    task_postrun,
    task_prerun,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from dispatcher import logs, metrics
from dispatcher.config import Settings


def install(app: Celery, settings: Settings) -> None:
    """Connect the signals: our logging, task ids in logs, worker gauges, the exporter.

    Each receiver has a dispatch_uid, so building several apps in one process
    (the tests do) connects it once; a worker process builds one app.
    """
    metrics.configure(settings)

    @setup_logging.connect(weak=False, dispatch_uid="dispatcher_logging")
    def _logging(**_: Any) -> None:
        # Connected, so Celery leaves the root logger to us.
        logs.configure(settings)

    @task_prerun.connect(weak=False, dispatch_uid="dispatcher_bind")
    def _bind(task_id: str | None = None, task: Any = None, kwargs: Any = None, **_: Any) -> None:
        args = kwargs if isinstance(kwargs, dict) else {}
        token = logs.set_context(
            task_id=task_id,
            task_name=getattr(task, "name", None),
            batch_id=args.get("batch_id") if isinstance(args.get("batch_id"), str) else None,
        )
        if task is not None:
            task.request.dispatcher_log_token = token

    @task_postrun.connect(weak=False, dispatch_uid="dispatcher_unbind")
    def _unbind(task: Any = None, **_: Any) -> None:
        token = getattr(getattr(task, "request", None), "dispatcher_log_token", None)
        if token is not None:
            logs.reset_context(token)

    @worker_ready.connect(weak=False, dispatch_uid="dispatcher_ready")
    def _ready(sender: Any = None, **_: Any) -> None:
        # The main process: one per node, so the gauge counts nodes per queue.
        metrics.worker_started(sender.app.amqp.queues.consume_from.keys())
        if settings.worker_metrics_port:
            metrics.serve_worker_metrics(
                host=settings.worker_metrics_host, port=settings.worker_metrics_port
            )

    @worker_process_shutdown.connect(weak=False, dispatch_uid="dispatcher_child_gone")
    def _child_gone(pid: int | None = None, **_: Any) -> None:
        metrics.process_exited(pid or os.getpid())

    @worker_shutdown.connect(weak=False, dispatch_uid="dispatcher_node_gone")
    def _node_gone(**_: Any) -> None:
        metrics.process_exited(os.getpid())
