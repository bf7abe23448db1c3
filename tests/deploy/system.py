"""A running system with metrics on: the gunicorn API and a Celery prefork worker, for real."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from dispatcher import metrics
from dispatcher.config import Settings
from dispatcher.supervisor import ROOT, Child, child_env
from tests.engine import system
from tests.helpers import answers, free_port, wait_for


class Process(Child):
    """A test child with the settings' environment plus ``env`` (the multiprocess directory)."""

    def __init__(self, argv: list[str], settings: Settings, log: Path, env: dict[str, str]) -> None:
        super().__init__(log.stem, argv, env={**child_env(settings), **env}, log=log, cwd=ROOT)


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in an exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


@dataclass
class Stack:
    api: str
    token: str
    api_proc: Process
    worker_proc: Process
    worker_metrics: str | None

    def scrape(self) -> str:
        reply = requests.get(
            f"{self.api}/metrics", headers={"Authorization": f"Bearer {self.token}"}, timeout=10
        )
        reply.raise_for_status()
        return reply.text


@contextmanager
def running(
    settings: Settings, logs: Path, *, api_dir: Path, worker_dir: Path, worker_port: int = 0
) -> Iterator[Stack]:
    """API and send worker (2 prefork processes); shared or separate metrics dirs.

    No beat: an immediate batch is published by the API after commit.
    """
    assert settings.metrics_token
    port = free_port()
    api_env = {metrics.MULTIPROC_ENV: str(api_dir)}
    worker_env = {metrics.MULTIPROC_ENV: str(worker_dir)}
    for d in {api_dir, worker_dir}:
        metrics.prepare_multiproc_dir(d)
    worker_settings = settings.replace(
        worker_metrics_port=worker_port, worker_metrics_host="127.0.0.1"
    )
    with system.Together() as processes:
        api = Process(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                "2",
                "--config",
                "python:dispatcher.gunicorn_conf",
                "api.wsgi:app",
            ],
            settings,
            logs / "api.log",
            api_env,
        )
        processes.add(api)
        worker = Process(
            system.celery(
                "worker",
                "-Q",
                "dispatch,send",
                "-n",
                f"metrics-{port}@%h",
                "-c",
                "2",
                "-P",
                "prefork",
                "--without-heartbeat",
                "--without-mingle",
                "--without-gossip",
            ),
            worker_settings,
            logs / "worker.log",
            worker_env,
        )
        processes.add(worker)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(f"{base}/health"), timeout=60)
        exporter = f"http://127.0.0.1:{worker_port}/metrics" if worker_port else None
        if exporter:
            wait_for(lambda: answers(exporter), timeout=60)
        yield Stack(base, settings.metrics_token, api, worker, exporter)
