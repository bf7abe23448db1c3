"""docker-compose.yml: health checks everywhere, start order by health, monitoring wired in."""

from __future__ import annotations

from typing import Any

import yaml

from tests.deploy.tools import DEPLOY, ROOT

ONE_SHOT = {"migrate"}


def services() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"])


def test_every_long_running_service_has_a_health_check() -> None:
    for name, service in services().items():
        if name in ONE_SHOT:
            assert service["restart"] == "no"
            continue
        check = service.get("healthcheck")
        assert check and check["test"], name
        assert check.get("interval") and check.get("timeout"), name


def test_depends_on_waits_for_health_or_completion() -> None:
    all_services = services()
    for name, service in all_services.items():
        for target, rule in (service.get("depends_on") or {}).items():
            expected = "service_completed_successfully" if target in ONE_SHOT else "service_healthy"
            assert rule == {"condition": expected}, (name, target)
            assert target in all_services
    # Nothing starts against an unmigrated database or a Redis that is not up.
    for name in ("api", "dispatch-worker", "send-worker", "callback-worker", "beat"):
        depends = all_services[name]["depends_on"]
        assert set(depends) == {"migrate", "redis"}, name


def test_metrics_are_wired_for_prometheus_and_grafana() -> None:
    all_services = services()
    prometheus, grafana = all_services["prometheus"], all_services["grafana"]
    mounted = " ".join(prometheus["volumes"])
    assert (
        "deploy/prometheus/prometheus.yml" in mounted and "deploy/prometheus/alerts.yml" in mounted
    )
    assert any("deploy/grafana/dashboards" in v for v in grafana["volumes"])
    for name in ("dispatch-worker", "send-worker", "callback-worker"):
        env = all_services[name]["environment"]
        assert env["DISPATCHER_WORKER_METRICS_PORT"] == "9100"
        assert env["PROMETHEUS_MULTIPROC_DIR"]
        # A tmpfs: emptied whenever the container (re)starts, never shared across hosts.
        assert any(
            t.startswith(env["PROMETHEUS_MULTIPROC_DIR"]) for t in all_services[name]["tmpfs"]
        )
    # prometheus-client turns multiprocess mode on when the variable exists, even
    # empty (files would land in the working directory): Flower must not have it.
    assert "PROMETHEUS_MULTIPROC_DIR" not in all_services["flower"]["environment"]
    for name, service in all_services.items():
        if isinstance(service.get("environment"), dict):
            assert service["environment"].get("PROMETHEUS_MULTIPROC_DIR", "x"), name
    assert "dispatcher.gunicorn_conf" in all_services["api"]["command"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"dispatcher-api", "dispatcher-workers", "flower"}
    assert jobs["dispatcher-api"]["authorization"]["credentials_file"]
    assert {9100} == {sd["port"] for sd in jobs["dispatcher-workers"]["dns_sd_configs"]}
    # Secrets stay out of the repository: only references to the environment.
    text = (ROOT / "docker-compose.yml").read_text()
    assert "METRICS_TOKEN:?" in text and "GRAFANA_ADMIN_PASSWORD:?" in text
