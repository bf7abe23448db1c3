"""Bounded tasks with real worker and beat processes: poison messages, expiring beats."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from dispatcher.config import Settings
from tests.engine import system
from tests.helpers import make_settings, wait_for
from workers import deadletter
from workers.celery_app import create_celery

pytestmark = pytest.mark.system
RUNS = "test:poison:runs"  # where tests/workers/poison_app.py marks each run


@pytest.fixture()
def bounded(sqlite_url: str, redis_url: str, tmp_path: Path) -> Settings:
    client = redis.Redis.from_url(redis_url)
    # Leftovers of an earlier module (ETA tasks of other settings) must not leak in.
    client.flushdb()
    client.close()
    return make_settings(
        database_url=sqlite_url,
        redis_url=redis_url,
        var=tmp_path,
        dead_letter_after=3,
        periodic_expires=1.0,
    )


def queued(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The messages waiting in a Celery queue on Redis (kombu keeps a list per queue)."""
    return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]


def test_a_task_that_kills_its_worker_every_time_is_dead_lettered(
    bounded: Settings, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(bounded.redis_url)
    app = create_celery(bounded)
    argv = [sys.executable, "-m", "celery", "-A", "tests.workers.poison_app", "worker"]
    argv += ["-Q", "dispatch", "-c", "1", "--loglevel", "INFO", "--without-heartbeat"]
    argv += ["--without-mingle", "--without-gossip"]
    worker = system.Process(argv, bounded, tmp_path / "poison-worker.log")
    try:
        app.send_task("test_poison", queue="dispatch", task_id="poison-1")
        entries = wait_for(lambda: deadletter.dead_letters(client), timeout=60)
        # Nothing is delivered again once it is dead-lettered.
        wait_for(lambda: not queued(client, "dispatch"), timeout=10)
        runs = client.llen(RUNS)
    finally:
        worker.stop()
    (entry,) = entries
    assert entry["id"] == "poison-1" and entry["task"] == "test_poison"
    # Three deliveries killed their process; the fourth was recorded and acknowledged.
    assert entry["deliveries"] == 3 and runs == 3
    assert not client.exists(deadletter.DELIVERIES + "poison-1")
    assert "dead-lettered test_poison[poison-1]" in worker.output()
    client.delete(RUNS, deadletter.DEAD_LETTERS)
    client.close()


def test_periodic_tasks_published_while_no_worker_runs_expire(
    bounded: Settings, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(bounded.redis_url)
    with system.beat(bounded, tmp_path):
        # Beat publishes every half second; nobody consumes.
        wait_for(lambda: len(queued(client, "dispatch")) >= 4, timeout=30)
    waiting = queued(client, "dispatch") + queued(client, "callbacks")
    assert all(m["headers"]["expires"] for m in waiting)
    ids = {m["headers"]["id"]: m["headers"]["task"] for m in waiting}
    latest = max(datetime.fromisoformat(m["headers"]["expires"]) for m in waiting)
    # Let them all pass their expiry, then start a worker: it drops them unrun.
    wait_for(lambda: datetime.now(latest.tzinfo) > latest, timeout=10)
    with system.worker(bounded, tmp_path, queues="dispatch,callbacks") as worker:
        wait_for(
            lambda: all(
                f"Discarding revoked task: {n}[{i}]" in worker.output() for i, n in ids.items()
            ),
            timeout=30,
        )
        output = worker.output()
    assert not queued(client, "dispatch")
    for task_id in ids:
        assert f"[{task_id}] succeeded" not in output
    client.close()
