"""The Grafana dashboard asks only for metrics that exist; provisioning points at it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.core import Metric
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import metrics
from dispatcher.runtime import Runtime
from tests.deploy.tools import DEPLOY

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "dispatcher-overview.json"
# A metric name in an expression: ours or Flower's (label names never start so).
_NAME = re.compile(r"\b((?:dispatcher|flower)_[a-z0-9_]+)\b")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _sample_names(families: list[Metric]) -> set[str]:
    names: set[str] = set()
    for family in families:
        names.update(family.name + s for s in _SUFFIXES.get(family.type, ("",)))
        names.update(s.name for s in family.samples)
    return names


def _flower_names() -> set[str]:
    # Flower's exporter, as its own code defines it (registered into a scratch registry).
    from flower.events import PrometheusMetrics
    from flower.options import options  # noqa: F401  (defines the buckets option)
    from prometheus_client import REGISTRY, CollectorRegistry

    scratch = CollectorRegistry()
    register, REGISTRY.register = REGISTRY.register, scratch.register  # type: ignore[method-assign]
    try:
        PrometheusMetrics()
    finally:
        REGISTRY.register = register  # type: ignore[method-assign]
    return _sample_names(list(scratch.collect()))


def exposed_names(runtime: Runtime) -> set[str]:
    """Every sample name the application and Flower can expose."""
    collector = metrics.BacklogCollector(sessions=runtime.sessions, redis_client=runtime.redis)
    families = list(metrics.registry().collect()) + list(collector.collect())
    return _sample_names(families) | _flower_names()


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]


def test_dashboard_references_only_metrics_that_exist(
    runtime: Runtime, sessions: sessionmaker[Session]
) -> None:
    exposed = exposed_names(runtime)
    assert "dispatcher_oldest_due_recipient_age_seconds" in exposed
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    referenced: set[str] = set()
    for expr in exprs:
        names = set(_NAME.findall(expr))
        assert names, f"no metric in {expr!r}"
        referenced |= names
    assert not referenced - exposed, sorted(referenced - exposed)
    # What the issue asks the overview to show is there.
    for needed in (
        "dispatcher_recipients_total",
        "dispatcher_send_lag_seconds_bucket",
        "dispatcher_queue_depth",
        "dispatcher_oldest_due_recipient_age_seconds",
        "dispatcher_oldest_due_callback_age_seconds",
        "dispatcher_callbacks_total",
        "dispatcher_callbacks_dead",
        "dispatcher_handoffs_total",
        "dispatcher_workers",
    ):
        assert needed in referenced, needed


def test_a_misspelt_metric_would_be_caught(runtime: Runtime) -> None:
    assert "dispatcher_recipient_total" not in exposed_names(runtime)


def test_grafana_provisioning_finds_the_dashboard_and_datasource() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] == "Dispatcher overview"
    sources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    uid = sources["datasources"][0]["uid"]
    assert {p["datasource"]["uid"] for p in board["panels"]} == {uid}
    providers = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/dispatcher.yml").read_text()
    )
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert Path(DASHBOARD).name.endswith(".json")
