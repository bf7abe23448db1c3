"""A real gunicorn serving the API on 127.0.0.1, as `make run` starts it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from dispatcher.config import Settings
from tests.engine.system import Process
from tests.helpers import free_port, wait_for


@dataclass
class Live:
    url: str
    process: Process


@contextmanager
def gunicorn(settings: Settings, log_dir: Path, *, workers: int = 1) -> Iterator[Live]:
    """Start gunicorn on a free port; stop it (by its process group) afterwards."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        "python:dispatcher.gunicorn_conf",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "api.wsgi:app",
    ]
    proc = Process(argv, settings, log_dir / f"gunicorn-{port}.log")
    url = f"http://127.0.0.1:{port}"

    def _up() -> bool:
        assert proc.proc.poll() is None, proc.output()
        try:
            return requests.get(f"{url}/health/live", timeout=5).status_code == 200
        except requests.RequestException:  # not listening yet, or the worker still booting
            return False

    try:
        wait_for(_up, timeout=60, interval=0.2)
        yield Live(url=url, process=proc)
    finally:
        proc.stop()
