"""Metrics and logs from real processes: gunicorn workers and a Celery prefork pool.

As under ``dispatcher run``: every process shares one multiprocess directory,
so the API's /metrics shows what the pool's child processes did.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from dispatcher.config import Settings
from dispatcher.runtime import Runtime
from tests.deploy import system
from tests.deploy.system import sample
from tests.factories import Tenant
from tests.helpers import RecordingPublisher, make_settings, wait_for

pytestmark = pytest.mark.system
TOKEN = "metrics-system-token"


@pytest.fixture(scope="module")
def settings_(
    sqlite_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    return make_settings(
        database_url=sqlite_url,
        redis_url=redis_url,
        var=tmp_path_factory.mktemp("metricsvar"),
        metrics_token=TOKEN,
        log_format="json",
        # A rate, so that the limiter is asked (and its waits observed).
        default_account_rate=1000.0,
    )


@pytest.fixture(scope="module")
def stack(settings_: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[system.Stack]:
    logs = tmp_path_factory.mktemp("metricslogs")
    shared = tmp_path_factory.mktemp("multiproc")
    with system.running(settings_, logs, api_dir=shared, worker_dir=shared) as stack:
        yield stack


def _send(stack: system.Stack, settings: Settings, n: int) -> tuple[str, Tenant]:
    rt = Runtime(settings, RecordingPublisher())
    try:
        tenant = Tenant(rt.sessions)
    finally:
        rt.dispose()
    reply = requests.post(
        f"{stack.api}/batch?key={tenant.key}",
        json={
            "from": "Dispatcher",
            "message": "hello",
            "destinations": [f"4477005{i:05d}" for i in range(n)],
        },
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    return str(reply.json()["identifier"]), tenant


def _total(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_pool_processes_metrics_reach_the_api_metrics(
    stack: system.Stack, settings_: Settings
) -> None:
    before = stack.scrape()
    sent_before = _total(before, "dispatcher_recipients_total", status="sent")
    handoffs_before = _total(before, "dispatcher_handoff_seconds_count", provider="simulator")
    _send(stack, settings_, 5)

    def sent() -> str | None:
        text = stack.scrape()
        return (
            text
            if _total(text, "dispatcher_recipients_total", status="sent") >= sent_before + 5
            else None
        )

    text = wait_for(sent, timeout=60, interval=0.5)
    # Sent and handed off in the pool's child processes, read by a gunicorn worker.
    assert (
        _total(text, "dispatcher_handoff_seconds_count", provider="simulator")
        >= handoffs_before + 5
    )
    assert _total(text, "dispatcher_handoffs_total", provider="simulator", outcome="accepted") >= 5
    assert _total(text, "dispatcher_send_lag_seconds_count") >= 5
    assert _total(text, "dispatcher_rate_limit_wait_seconds_count") >= 1
    # Queued at intake by the API process, counted in the same exposition.
    assert _total(text, "dispatcher_recipients_total", status="queued") >= 5
    assert sample(text, "dispatcher_workers", queue="send") == 1
    assert sample(text, "dispatcher_workers", queue="dispatch") == 1
    assert sample(text, "dispatcher_backlog_scrape_ok") == 1


def test_logs_are_json_with_ids_and_access_lines_hide_query_strings(
    stack: system.Stack, settings_: Settings
) -> None:
    batch_id, tenant = _send(stack, settings_, 1)

    def worker_lines() -> list[dict[str, object]]:
        return [line for line in _json_lines(stack.worker_proc.log) if line.get("task_id")]

    tasks = wait_for(worker_lines, timeout=30)
    assert {"timestamp", "level", "logger", "message", "task_id", "task_name"} <= set(tasks[0])
    # A task about a batch carries its id.
    wait_for(lambda: any(line.get("batch_id") == batch_id for line in worker_lines()), timeout=30)
    api_log = stack.api_proc.output()
    assert tenant.key not in api_log
    access = [
        line for line in _json_lines(stack.api_proc.log) if line["logger"] == "gunicorn.access"
    ]
    assert any('"POST /batch ' in str(line["message"]) for line in access), access[-3:]


def _json_lines(path: Path) -> list[dict[str, object]]:
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        if raw.startswith("{"):
            lines.append(json.loads(raw))
    return lines
