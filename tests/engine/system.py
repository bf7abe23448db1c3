"""Running the real thing for tests: Celery worker and beat processes on real Redis."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import redis

from dispatcher.config import Settings
from dispatcher.runtime import Runtime
from dispatcher.supervisor import ROOT, STOP_GRACE, Child, child_env
from workers.celery_app import create_celery

P = TypeVar("P", bound=Child)


def celery(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "workers.main", *args]


class Process(Child):
    """A child in its own process group with the settings' environment, logging to ``log``."""

    def __init__(self, argv: list[str], settings: Settings, log: Path) -> None:
        super().__init__(log.stem, argv, env=child_env(settings), log=log, cwd=ROOT)


@contextmanager
def worker(settings: Settings, log_dir: Path, **options: Any) -> Iterator[Process]:
    """A real Celery worker process (``options``: :func:`worker_process`'s), stopped after."""
    proc = worker_process(settings, log_dir, **options)
    try:
        yield proc
    finally:
        proc.stop()


def worker_process(
    settings: Settings,
    log_dir: Path,
    *,
    name: str = "send",
    queues: str = "dispatch,send",
    concurrency: int = 1,
    pool: str = "prefork",
    log_name: str | None = None,
) -> Process:
    """Start a real Celery worker process consuming ``queues`` (the caller stops it);
    it logs to ``<log_name or name>-worker.log`` in ``log_dir``."""
    return Process(
        celery(
            "worker",
            "-Q",
            queues,
            "-n",
            f"{name}-{os.getpid()}@%h",
            "-c",
            str(concurrency),
            "-P",
            pool,
            "--loglevel",
            "INFO",
            "--without-heartbeat",
            "--without-mingle",
            "--without-gossip",
        ),
        settings,
        log_dir / f"{log_name or name}-worker.log",
    )


def beat_process(settings: Settings, log_dir: Path) -> Process:
    """Start a real Celery beat process (the scheduler; the caller stops it)."""
    return Process(
        celery("beat", "--loglevel", "INFO", "--schedule", str(log_dir / "beat-schedule")),
        settings,
        log_dir / "beat.log",
    )


@contextmanager
def beat(settings: Settings, log_dir: Path) -> Iterator[Process]:
    """A real Celery beat process (the scheduler), stopped after."""
    proc = beat_process(settings, log_dir)
    try:
        yield proc
    finally:
        proc.stop()


def stop_together(procs: list[Child]) -> None:
    """Tell every process to stop (SIGTERM to its group) before waiting for any, so their
    warm shutdowns overlap: a prefork worker's takes over a second (billiard's pool
    processes sleep 1 s as they exit), and stopped one after another they added up."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.finish(STOP_GRACE)  # then SIGKILLs what is left of the group


class Together:
    """Processes started in a ``with`` block (``add`` each as it starts), stopped together
    at its end, the last started first signalled."""

    def __init__(self) -> None:
        self.procs: list[Child] = []

    def add(self, proc: P) -> P:
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Together:
        return self

    def __exit__(self, *_: object) -> None:
        stop_together(self.procs[::-1])


@contextmanager
def runtime(settings: Settings) -> Iterator[Runtime]:
    """The test process's runtime, publishing to the real broker, on an emptied Redis
    database (ETA tasks an earlier module left with other settings must not leak in)."""
    app = create_celery(settings)
    rt: Runtime = app.runtime
    redis.Redis.from_url(settings.redis_url).flushdb()
    try:
        yield rt
    finally:
        rt.dispose()
