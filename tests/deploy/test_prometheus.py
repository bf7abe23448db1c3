"""Alert rules checked and unit-tested by promtool; a real Prometheus scrapes a running system.

Needs Debian's ``prometheus`` package (``prometheus`` and ``promtool``):
skipped without it, required under CI=true (``make test`` installs it there).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from dispatcher.config import Settings
from dispatcher.runtime import Runtime
from dispatcher.supervisor import Child
from tests.deploy import system
from tests.deploy.tools import DEPLOY, binary
from tests.engine.system import celery
from tests.factories import Tenant
from tests.helpers import RecordingPublisher, free_port, make_settings, wait_for

RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
TOKEN = "prometheus-test-token"
FLOWER_AUTH = "prom:flower-test-password"


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def test_promtool_accepts_the_rules() -> None:
    done = _run([binary("promtool"), "check", "rules", str(RULES)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 7 rules found" in done.stdout


def test_promtool_unit_tests_pass_and_cover_every_alert() -> None:
    done = _run([binary("promtool"), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    # Each alert is shown both to fire and to stay quiet.
    assert fired == alerts
    assert quiet == alerts


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(
        RULES.read_text().replace("max(dispatcher_oldest", "max(dispatcher_oldest(", 1)
    )
    assert _run([binary("promtool"), "check", "rules", str(broken)]).returncode != 0


def test_the_compose_prometheus_config_is_valid(tmp_path: Path) -> None:
    # The paths the compose service mounts, pointed at temporary copies.
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    (tmp_path / "alerts.yml").write_text(RULES.read_text())
    for name in ("metrics-token", "flower-password"):
        (tmp_path / name).write_text("x\n")
    text = text.replace("/etc/prometheus/", f"{tmp_path}/").replace(
        "/run/prometheus/", f"{tmp_path}/"
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace("__FLOWER_USER__", "admin"))
    done = _run([binary("promtool"), "check", "config", str(config)])
    assert done.returncode == 0, done.stdout + done.stderr


# --- a real Prometheus server ---------------------------------------------------------


@pytest.fixture(scope="module")
def live_settings(
    sqlite_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    return make_settings(
        database_url=sqlite_url,
        redis_url=redis_url,
        var=tmp_path_factory.mktemp("promvar"),
        metrics_token=TOKEN,
    )


@pytest.fixture(scope="module")
def stack(
    live_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[system.Stack]:
    binary("prometheus")
    logs = tmp_path_factory.mktemp("promlogs")
    # As in compose: the API and the worker each have their own directory, and
    # the worker serves its pool's metrics on a port of its own.
    with system.running(
        live_settings,
        logs,
        api_dir=tmp_path_factory.mktemp("api-metrics"),
        worker_dir=tmp_path_factory.mktemp("worker-metrics"),
        worker_port=free_port(),
    ) as running:
        yield running


@pytest.fixture(scope="module")
def flower(
    live_settings: Settings, stack: system.Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Flower behind basic auth, as in compose; returns its host:port."""
    port = free_port()
    proc = system.Process(
        celery("flower", f"--port={port}", "--address=127.0.0.1", f"--basic-auth={FLOWER_AUTH}"),
        live_settings,
        tmp_path_factory.mktemp("flowerlogs") / "flower.log",
        # No PROMETHEUS_MULTIPROC_DIR (even empty, it would turn multiprocess mode on):
        # Flower's /metrics reads its own registry.
        {},
    )
    try:
        wait_for(lambda: _status(f"http://127.0.0.1:{port}/healthcheck") == 200, timeout=60)
        # Flower 2 serves /metrics and /healthcheck without its basic auth (the README
        # says so); the UI and API stay behind it.
        assert _status(f"http://127.0.0.1:{port}/api/workers") == 401
        yield f"127.0.0.1:{port}"
    finally:
        proc.stop()


def _status(url: str) -> int:
    try:
        return requests.get(url, timeout=2).status_code
    except requests.RequestException:
        return 0


@pytest.fixture(scope="module")
def prometheus(
    stack: system.Stack, flower: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    work = tmp_path_factory.mktemp("prometheus")
    (work / "token").write_text(TOKEN + "\n")
    user, password = FLOWER_AUTH.split(":")
    (work / "flower-password").write_text(password)
    assert stack.worker_metrics is not None
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "dispatcher-api",
                "authorization": {"type": "Bearer", "credentials_file": str(work / "token")},
                "static_configs": [{"targets": [stack.api.removeprefix("http://")]}],
            },
            {
                "job_name": "dispatcher-workers",
                "static_configs": [
                    {"targets": [stack.worker_metrics.removeprefix("http://").split("/")[0]]}
                ],
            },
            {
                "job_name": "flower",
                "basic_auth": {"username": user, "password_file": str(work / "flower-password")},
                "static_configs": [{"targets": [flower]}],
            },
        ],
    }
    (work / "prometheus.yml").write_text(json.dumps(config))
    port = free_port()
    server = Child(
        "prometheus",
        [
            binary("prometheus"),
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        env={"PATH": os.environ.get("PATH", "")},
        log=work / "prometheus.log",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _status(f"{base}/-/ready") == 200, timeout=60, interval=0.2)
        yield base
    finally:
        server.stop()


def query(base: str, promql: str) -> list[dict[str, object]]:
    reply = requests.get(f"{base}/api/v1/query", params={"query": promql}, timeout=10)
    reply.raise_for_status()
    body = reply.json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def _value(base: str, promql: str) -> float:
    result = query(base, promql)
    return float(result[0]["value"][1]) if result else 0.0  # type: ignore[index]


def test_prometheus_scrapes_the_api_and_the_worker(
    prometheus: str, stack: system.Stack, live_settings: Settings
) -> None:
    wait_for(lambda: _value(prometheus, "sum(up)") == 3, timeout=30)
    rt = Runtime(live_settings, RecordingPublisher())
    try:
        tenant = Tenant(rt.sessions)
    finally:
        rt.dispose()
    reply = requests.post(
        f"{stack.api}/batch",
        headers=tenant.auth,
        json={
            "from": "Dispatcher",
            "message": "hi",
            "destinations": ["447700501234", "447700501235"],
        },
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    # Sent in the worker's pool processes, seen through the worker's exporter.
    wait_for(
        lambda: (
            _value(
                prometheus,
                'sum(dispatcher_recipients_total{job="dispatcher-workers",status="sent"})',
            )
            >= 2
        ),
        timeout=60,
        interval=0.5,
    )
    # The intake request, seen through the API's /metrics (token-guarded).
    api_posts = (
        'sum(dispatcher_http_requests_total{job="dispatcher-api",route="/batch",method="POST"})'
    )
    wait_for(lambda: _value(prometheus, api_posts) >= 1, timeout=30, interval=0.5)
    assert _value(prometheus, 'sum(dispatcher_workers{queue="send"})') == 1
    depth = query(prometheus, "dispatcher_queue_depth")
    assert {r["metric"]["queue"] for r in depth} == {"dispatch", "send", "callbacks"}  # type: ignore[index]
    # Flower saw the worker's task events and exports them (behind basic auth).
    wait_for(lambda: _value(prometheus, "sum(flower_events_total)") > 0, timeout=30, interval=0.5)
    # With a worker on dispatch and send but none on callbacks, that alert is pending.
    wait_for(
        lambda: any(
            a["labels"].get("queue") == "callbacks"
            for a in requests.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"][
                "alerts"
            ]
            if a["labels"]["alertname"] == "DispatcherNoWorker"
        ),
        timeout=30,
        interval=0.5,
    )
