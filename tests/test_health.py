"""/health, /health/live and /health/ready: 503 naming the part that is down, never a 500."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient

from api.app import create_app
from dispatcher import health
from dispatcher.config import Settings
from dispatcher.runtime import Runtime
from tests.engine.system import Together, worker_process
from tests.helpers import RecordingPublisher, free_port, wait_for


@contextmanager
def client_for(settings: Settings) -> Iterator[FlaskClient]:
    runtime = Runtime(settings, RecordingPublisher())
    try:
        yield create_app(settings, runtime=runtime).test_client()
    finally:
        runtime.dispose()


@pytest.fixture()
def isolated(settings: Settings) -> Settings:
    """The test settings on a Redis database of their own: no other test's heartbeats."""
    return settings.replace(redis_url=settings.redis_url.rsplit("/", 1)[0] + "/7")


@pytest.fixture()
def quiet(isolated: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(isolated.redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def test_live_answers_without_looking_at_anything(isolated: Settings) -> None:
    down = isolated.replace(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        database_url="postgresql+psycopg://nobody@127.0.0.1:1/none",
    )
    with client_for(down) as client:
        reply = client.get("/health/live")
        assert reply.status_code == 200
        assert reply.get_json()["status"] == "ok"


def test_redis_down_is_a_503_that_names_redis(isolated: Settings) -> None:
    down = isolated.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with client_for(down) as client:
        for path in ("/health", "/health/ready"):
            reply = client.get(path)
            assert reply.status_code == 503, path
            body = reply.get_json()
            assert body["status"] == "unavailable"
            assert "redis" in body["failing"]
            assert body["checks"]["database"] == "ok"


def test_database_down_is_a_503_that_names_the_database(isolated: Settings) -> None:
    down = isolated.replace(database_url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    with client_for(down) as client:
        reply = client.get("/health")
        assert reply.status_code == 503
        assert reply.get_json()["failing"] == ["database"]
        assert reply.get_json()["checks"]["redis"] == "ok"


def test_health_is_ok_with_database_and_redis(isolated: Settings, quiet: redis.Redis) -> None:
    with client_for(isolated) as client:
        reply = client.get("/health")
        assert reply.status_code == 200
        assert reply.get_json() == {
            "status": "ok",
            "checks": {"database": "ok", "redis": "ok"},
            "failing": [],
        }


def test_ready_names_each_queue_without_a_worker(isolated: Settings, quiet: redis.Redis) -> None:
    health.beat(client=quiet, queues=["send"], hostname="send@a", ttl=30)
    with client_for(isolated) as client:
        reply = client.get("/health/ready")
        assert reply.status_code == 503
        assert reply.get_json()["failing"] == ["workers.dispatch", "workers.callbacks"]


def test_a_heartbeat_older_than_its_window_does_not_count(
    isolated: Settings, quiet: redis.Redis
) -> None:
    health.beat(client=quiet, queues=health.QUEUES, hostname="w@a", ttl=1)
    assert health.workers_seen(client=quiet) == {"dispatch": 1, "send": 1, "callbacks": 1}
    wait_for(lambda: health.workers_seen(client=quiet)["send"] == 0, timeout=5)


@pytest.mark.system
def test_ready_once_real_workers_beat_and_not_after_they_stop(
    isolated: Settings, quiet: redis.Redis, tmp_path: Path
) -> None:
    settings = isolated.replace(worker_seen_within=3.0)
    with client_for(settings) as client:
        with Together() as workers:
            workers.add(worker_process(settings, tmp_path, name="send", queues="dispatch,send"))
            workers.add(worker_process(settings, tmp_path, name="callbacks", queues="callbacks"))
            wait_for(lambda: client.get("/health/ready").status_code == 200, timeout=60)
            seen = health.workers_seen(client=quiet)
            assert seen == {"dispatch": 1, "send": 1, "callbacks": 1}
        # A worker that stops says so: its keys go at once, not after the window.
        reply = client.get("/health/ready")
        assert reply.status_code == 503
        assert set(reply.get_json()["failing"]) == {
            "workers.dispatch",
            "workers.send",
            "workers.callbacks",
        }
