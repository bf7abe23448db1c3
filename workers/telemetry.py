"""Metrics, logs and Sentry for Celery processes (wired by the app factory)."""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping
from datetime import timedelta
from typing import Any

from celery import Celery
from celery.app import trace
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

# Periodic tasks beat runs more often than this (seconds) are routine: the lines that
# only say one was sent, received or succeeded are logged at DEBUG (at INFO, an idle
# `make run` printed some 400 of them a minute and buried every warning).
ROUTINE_UNDER = 60.0
# Where Celery logs those lines: beat's "Sending due task", a worker's "received" and
# "succeeded" (its failures, retries and everything else keep their level).
ROUTINE_LOGGERS = ("celery.beat", "celery.worker.strategy", "celery.app.trace")
_BEAT_SENDS = "Scheduler: Sending due task %s (%s)"
_WORKER_LINES = frozenset({trace.LOG_RECEIVED, trace.LOG_SUCCESS})


def frequent_tasks(schedule: Mapping[str, Mapping[str, Any]]) -> frozenset[str]:
    """The tasks a beat schedule runs more often than every ROUTINE_UNDER seconds."""
    frequent = set()
    for entry in schedule.values():
        every = entry["schedule"]
        seconds = every.total_seconds() if isinstance(every, timedelta) else every
        if isinstance(seconds, int | float) and seconds < ROUTINE_UNDER:
            frequent.add(str(entry["task"]))
    return frozenset(frequent)


def _task_of(record: logging.LogRecord) -> str | None:
    """The task a routine Celery line is about (None: any other line)."""
    args = record.args
    if record.msg == _BEAT_SENDS and isinstance(args, tuple) and len(args) == 2:
        return str(args[1])
    if record.msg in _WORKER_LINES and isinstance(args, Mapping):
        return str(args.get("name"))
    return None


class RoutineAtDebug(logging.Filter):
    """Logs Celery's routine INFO lines about ``tasks`` at DEBUG instead (a logger filter:
    a record the logger's level lets through at DEBUG is shown, else dropped)."""

    def __init__(self, tasks: Collection[str]) -> None:
        super().__init__()
        self.tasks = frozenset(tasks)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or _task_of(record) not in self.tasks:
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def quiet_routine(tasks: Collection[str]) -> None:
    """Install :class:`RoutineAtDebug` for ``tasks`` on Celery's loggers (idempotent)."""
    for name in ROUTINE_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, RoutineAtDebug)]:
            logger.removeFilter(old)
        logger.addFilter(RoutineAtDebug(tasks))


def install(app: Celery, settings: Settings) -> None:
    """Connect the signals: our logging, task ids in logs, worker gauges, the exporter.

    Each receiver has a dispatch_uid, so building several apps in one process
    (the tests do) connects it once; a worker process builds one app.
    """
    metrics.configure(settings)
    routine = frequent_tasks(app.conf.beat_schedule)

    @setup_logging.connect(weak=False, dispatch_uid="dispatcher_logging")
    def _logging(**_: Any) -> None:
        # Connected, so Celery leaves the root logger to us.
        logs.configure(settings)
        quiet_routine(routine)

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
