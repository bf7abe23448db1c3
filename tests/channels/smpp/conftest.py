"""SMPP test parts: smpp34's SMSC (LocalSmsc) and the connector, each in a thread of its own."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
import redis

from dispatcher.channels.base import Receipt
from dispatcher.channels.smpp.config import SmppConfig, parse
from dispatcher.channels.smpp.connector import Connector, Inbound
from dispatcher.channels.smpp.provider import SmppProvider
from dispatcher.ratelimit import RateLimiter
from tests.helpers import free_port, wait_for

PASSWORD = "pw-9x7"


class RecordingSink:
    """Keeps what the connector hands over (the Sink protocol through :class:`Sink`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.receipts: list[Receipt] = []
        self.inbound: list[Inbound] = []


class Sink:
    """The Sink protocol over a RecordingSink."""

    def __init__(self, record: RecordingSink) -> None:
        self.record = record

    def receipts(self, batch: Sequence[Receipt]) -> None:
        with self.record.lock:
            self.record.receipts.extend(batch)

    def inbound(self, batch: Sequence[Inbound]) -> None:
        with self.record.lock:
            self.record.inbound.extend(batch)


def smpp_config(
    carriers: dict[str, list[int]],
    *,
    routes: list[dict[str, Any]] | None = None,
    response_timeout: float = 3,
    request_timeout: float = 8,
    **conn: Any,
) -> SmppConfig:
    """One connection per port, per carrier; fast timers for tests."""
    raw: dict[str, Any] = {
        "carriers": {
            name: {
                "connections": [
                    {
                        "name": f"{name}-{i}",
                        "host": "127.0.0.1",
                        "port": port,
                        "system_id": name[:15],
                        "password": PASSWORD,
                        **conn,
                    }
                    for i, port in enumerate(ports)
                ]
            }
            for name, ports in carriers.items()
        },
        "response_timeout": response_timeout,
        "request_timeout": request_timeout,
        "throttle_pause": 0.3,
        "reconnect_min": 0.2,
        "reconnect_max": 1,
    }
    if routes:
        raw["routes"] = routes
    return parse(raw)


@pytest.fixture()
def smpp_redis(redis_url: str) -> Iterator[redis.Redis]:
    # A worker's client's socket timeout (Runtime.redis): above the provider's blocking reads.
    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    for key in client.scan_iter("dispatcher:smpp:*"):
        client.delete(key)
    for key in client.scan_iter("dispatcher:rl:smpp:*"):
        client.delete(key)
    yield client
    client.close()


@pytest.fixture()
def port() -> int:
    return free_port()


@contextmanager
def connector_running(
    config: SmppConfig,
    redis_url: str,
    record: RecordingSink,
    *,
    limiter: RateLimiter | None = None,
) -> Iterator[Connector]:
    """A connector on its own loop in a thread; stopped (unbinding) at the end."""
    connector = Connector(config=config, redis_url=redis_url, sink=Sink(record), limiter=limiter)
    failure: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(connector.run())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=main, name="connector", daemon=True)
    thread.start()
    try:
        yield connector
    finally:
        connector.stop()
        thread.join(20)
        assert not thread.is_alive(), "the connector did not stop"
        assert not failure, failure


def wait_live(provider: SmppProvider, carrier: str, timeout: float = 10) -> None:
    wait_for(lambda: carrier in provider.live_carriers(), timeout=timeout)


def live_provider(
    smpp_redis: redis.Redis, config: SmppConfig, carrier: str = "local"
) -> SmppProvider:
    """A worker's SmppProvider, once ``carrier`` has a bound connection."""
    provider = SmppProvider(redis_client=smpp_redis, config=config)
    wait_live(provider, carrier)
    return provider
