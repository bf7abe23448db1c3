"""Running the real thing for tests: Celery worker and beat processes on real Redis."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dispatcher.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env.update(settings.to_env())
    env["PYTHONPATH"] = str(ROOT)
    return env


def celery(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "workers.main", *args]


class Process:
    """A child started in its own process group, stopped by its PID only."""

    def __init__(self, argv: list[str], settings: Settings, log: Path) -> None:
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            argv,
            env=_env(settings),
            cwd=ROOT,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill_group(signal.SIGKILL)
                self.proc.wait(timeout=15)
        # Pool children share the group; leave none behind.
        self.kill_group(signal.SIGKILL)
        self._out.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def worker(
    settings: Settings,
    log_dir: Path,
    *,
    name: str = "send",
    queues: str = "dispatch,send",
    concurrency: int = 1,
    pool: str = "prefork",
) -> Iterator[Process]:
    """A real Celery worker process consuming ``queues``."""
    proc = Process(
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
        log_dir / f"{name}-worker.log",
    )
    try:
        yield proc
    finally:
        proc.stop()


@contextmanager
def beat(settings: Settings, log_dir: Path) -> Iterator[Process]:
    """A real Celery beat process (the scheduler)."""
    proc = Process(
        celery("beat", "--loglevel", "INFO", "--schedule", str(log_dir / "beat-schedule")),
        settings,
        log_dir / "beat.log",
    )
    try:
        yield proc
    finally:
        proc.stop()
