"""Helpers shared by the tests: ports, waiting with a deadline, settings, a recording publisher.

Test modules import from here (and from tests/factories.py), never from each other;
tests/conftest.py builds its fixtures on the same helpers.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from socketserver import BaseServer
from typing import TYPE_CHECKING, Any, TypeVar

import redis
import requests

from dispatcher import outbox
from dispatcher.config import Settings

if TYPE_CHECKING:
    from flask.testing import FlaskClient

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
    """A port free on 127.0.0.1 now, for a server that binds it later (a subprocess, mostly).

    Picked below the kernel's ephemeral range: bind(0) and every outbound connection (the
    suite makes thousands: HTTP, Redis, PostgreSQL) take their ports from that range, so
    a port picked there could be a client socket's by the time its server binds it (CI
    saw "Address already in use"). Random from the OS: two test processes seeded alike
    must not pick alike.
    """
    low = _ephemeral_range()[0]
    for _ in range(200):
        port = _PICK.randrange(10000, low) if low > 11000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free port on 127.0.0.1 below the ephemeral range")


_PICK = random.SystemRandom()


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for ports it picks itself (Linux; IANA's elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


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


S = TypeVar("S", bound=BaseServer)


@contextmanager
def in_thread(server: S, *, before_stop: Callable[[], None] | None = None) -> Iterator[S]:
    """``server`` answering from a thread of its own until the block ends; then
    ``before_stop`` (release what its handlers wait on), shut down, closed and joined."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        if before_stop is not None:
            before_stop()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def wait_for_redis(client: redis.Redis, *, timeout: float = 20.0) -> None:
    """Wait until a redis-server just started answers ``client``'s PING."""

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_for(up, timeout=timeout)


def answers(url: str) -> bool:
    """Whether a server just started answers ``url`` without a server error yet. Refused,
    or slow to answer (a loaded machine, a niced process): not yet, to be asked again."""
    try:
        return requests.get(url, timeout=2).status_code < 500
    except requests.RequestException:
        return False


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


class RecordingPublisher:
    """Collects what would be published, for API tests that run no worker."""

    def __init__(self) -> None:
        self.messages: list[outbox.Message | outbox.Revoke] = []

    def publish(self, messages: list[outbox.Message | outbox.Revoke]) -> None:
        self.messages.extend(messages)


def post_batch(api: FlaskClient, key: str, destinations: list[str], **extra: object) -> str:
    """``POST /batch`` (Messaging Plus) with the API key ``key``; returns the batch id."""
    body = {"from": "Dispatcher", "message": "hi", "destinations": destinations, **extra}
    reply = api.post(
        "/batch?allowMulti=true", json=body, headers={"Authorization": f"Bearer {key}"}
    )
    assert reply.status_code == 200, reply.get_json()
    return str(reply.get_json()["identifier"])
