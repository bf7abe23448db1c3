"""Invariant 2 across a Redis restart: real Redis, Celery worker and beat processes.

Redis holds the Celery queues, unacked and ETA tasks, the rate limiter, the
simulator's ledger and pending receipts, the receipt wake-ups and the callback
endpoints' gates. A batch is sending when its redis-server stops and starts
again on the same port: once with its data (the append-only file ``make run``
keeps), once without (a server that persists nothing, or an operator's flush).
Either way every recipient must end final, nothing may reach the carrier twice,
and the callback of every status change must arrive.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from dispatcher.batches.models import Recipient, StatusEvent
from dispatcher.channels.simulator import Simulator
from dispatcher.config import Settings
from dispatcher.db import utcnow
from dispatcher.devserver import redis_server_command
from dispatcher.runtime import Runtime
from dispatcher.states import RecipientStatus
from dispatcher.supervisor import Child, Supervisor
from tests.engine import system
from tests.factories import Tenant
from tests.helpers import free_port, make_settings, wait_for, wait_for_redis
from tests.helpers.engine import numbers, send
from tests.helpers.reads import callbacks, recipients

pytestmark = pytest.mark.system
R = RecipientStatus
MARKER = "test:before-the-restart"
# Seconds Redis stays down: tasks in flight meet it gone (limiter, gates, wake-ups, acks).
OUTAGE = 1.0


class RedisServer:
    """The module's own redis-server with an append-only file, which a test restarts."""

    def __init__(self, data: Path, log: Path) -> None:
        self.port = free_port()
        self.data = data
        self.log = log
        self.restarts = 0
        self.stopped = 0.0
        self.child = self._start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _start(self) -> Child:
        self.data.mkdir(parents=True, exist_ok=True)
        child = Child(
            "redis",
            redis_server_command(port=self.port, data_dir=self.data, persist=True),
            env=os.environ,
            log=self.log.with_name(f"redis-{self.restarts}.log"),
        )
        client = redis.Redis.from_url(self.url)
        try:
            wait_for_redis(client)
        finally:
            client.close()
        return child

    def stop(self) -> None:
        """SIGTERM: Redis writes its append-only file and exits."""
        assert self.child.stop(), "redis-server did not stop on SIGTERM"
        self.stopped = time.monotonic()

    def start(self, *, keep_data: bool) -> None:
        """Start again on the same port after OUTAGE seconds: in the same directory, or in
        an empty one (a server that persisted nothing)."""
        self.restarts += 1
        if not keep_data:
            self.data = self.data.with_name(f"{self.data.name}-{self.restarts}")
        wait_for(lambda: time.monotonic() > self.stopped + OUTAGE, timeout=OUTAGE + 5)
        self.child = self._start()


class Kept:
    """A worker kept running as a process manager keeps one (docker-compose's restart
    policy, systemd's ``Restart=``): started again whenever it has exited.

    kombu's Redis transport can end a worker on an outage: closing the lost connection,
    it restores the unacknowledged messages through a connection that is gone
    ("Unrecoverable error: AttributeError: 'NoneType' object has no attribute
    'hostname'", kombu 5.7; an upstream bug). Invariant 2 is the deployment's, with its
    process manager: what that worker held is in Redis and the database, and the next
    worker carries on.
    """

    def __init__(self, settings: Settings, logs: Path, *, name: str, **options: Any) -> None:
        self._start = functools.partial(system.worker_process, settings, logs, name=name, **options)
        self.name = name
        self.procs = [self._start()]  # every one started, for their logs
        self._sup = Supervisor()
        self._sup.add(self.procs[0])
        self._done = threading.Event()
        self._watcher = threading.Thread(
            target=self._sup.keep,
            args=(self._done.is_set,),
            kwargs={"restart": self._again, "poll": 0.2},
            daemon=True,
        )
        self._watcher.start()

    def _again(self, dead: Child) -> bool:
        """Start the next worker (``Supervisor.keep`` has stopped the one that exited)."""
        self.procs.append(self._start(log_name=f"{self.name}-{len(self.procs)}"))
        self._sup.add(self.procs[-1])
        return True

    def output(self) -> str:
        return "".join(p.output() for p in self.procs)

    def stop(self) -> None:
        self._done.set()
        self._watcher.join(timeout=5)
        self._sup.stop()


@contextmanager
def kept(settings: Settings, logs: Path, *, name: str, **options: Any) -> Iterator[Kept]:
    worker = Kept(settings, logs, name=name, **options)
    try:
        yield worker
    finally:
        worker.stop()


class Edge(ThreadingHTTPServer):
    """A carrier (``/carrier``: the http provider's POSTs, counted per idempotency key) and
    a webhook receiver (``/hooks``: each callback's webhook-id and body) on 127.0.0.1."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), EdgeHandler)
        self.lock = threading.Lock()
        self.handed: Counter[str] = Counter()
        self.hooks: dict[str, dict[str, Any]] = {}
        self.arrivals: Counter[str] = Counter()
        # Cleared: callbacks are held unanswered (``held`` counts them) until it is set.
        self.answering = threading.Event()
        self.answering.set()
        self.held = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A worker stopped with a kept-alive connection open resets it: nothing to report."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def handoffs(self) -> Counter[str]:
        with self.lock:
            return Counter(self.handed)

    def received(self) -> dict[str, dict[str, Any]]:
        """The callbacks that arrived, by webhook-id (a redelivery keeps its id)."""
        with self.lock:
            return dict(self.hooks)


class EdgeHandler(BaseHTTPRequestHandler):
    server: Edge
    protocol_version = "HTTP/1.1"  # kept-alive connections, as real receivers keep them
    # Buffered: each answer goes out in one write (headers and body apart, the second
    # waits for the client's delayed ACK: 40 ms a POST on a kept-alive connection).
    wbufsize = -1

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        if self.path != "/carrier" and not self.server.answering.is_set():
            with self.server.lock:
                self.server.held += 1
            self.server.answering.wait(timeout=60)
        with self.server.lock:
            if self.path == "/carrier":
                self.server.handed[body["id"]] += 1
                reply = json.dumps({"id": f"c-{body['id']}"}).encode()
            else:
                self.server.hooks[self.headers["webhook-id"]] = body
                self.server.arrivals[self.headers["webhook-id"]] += 1
                reply = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


@pytest.fixture(scope="module")
def edge() -> Iterator[Edge]:
    server = Edge()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory, own_database_url: str) -> Path:
    """The processes' logs, a directory per database."""
    return tmp_path_factory.mktemp("restart-logs")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, logs: Path) -> Iterator[RedisServer]:
    own = RedisServer(tmp_path_factory.mktemp("restart-redis") / "data", logs / "redis.log")
    yield own
    own.child.stop()


@pytest.fixture(scope="module")
def restart_settings(
    own_database_url: str,
    server: RedisServer,
    edge: Edge,
    tmp_path_factory: pytest.TempPathFactory,
) -> Settings:
    """SMS on the simulator, RCS on the http provider to ``edge``; the sweeps' timers short
    enough that what Redis lost is found again within the test."""
    return make_settings(
        database_url=own_database_url,
        redis_url=server.url,
        var=tmp_path_factory.mktemp("restart-var"),
        channel_providers={"rcs": "http"},
        http_provider_url=edge.url("/carrier"),
        # Lost dispatches, chunks and callback tasks are published again this soon.
        requeue_after=5,
        stall_after=4,
        callback_requeue_after=3,
    )


@pytest.fixture(scope="module")
def live(restart_settings: Settings) -> Iterator[Runtime]:
    with system.runtime(restart_settings) as rt:
        yield rt


@pytest.fixture(scope="module")
def api(live: Runtime) -> FlaskClient:
    return create_app(live.settings, runtime=live).test_client()


@pytest.fixture(scope="module", autouse=True)
def processes(restart_settings: Settings, logs: Path, live: Runtime) -> Iterator[None]:
    """The callback worker and beat; each test starts its send worker."""
    settings = restart_settings
    with (
        kept(settings, logs, name="callbacks", queues="callbacks"),
        system.beat(settings, logs),
    ):
        yield


def in_states(sessions: sessionmaker[Session], batch_ids: list[str], states: set[R]) -> bool:
    rows = [r for b in batch_ids for r in recipients(sessions, b)]
    return bool(rows) and all(r.status in states for r in rows)


def count_in(sessions: sessionmaker[Session], batch_id: str, *statuses: R) -> int:
    with sessions() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(Recipient)
                .where(Recipient.batch_id == batch_id, Recipient.status.in_(statuses))
            )
            or 0
        )


def handed_over(sessions: sessionmaker[Session], batch_id: str) -> int:
    """How many of the batch's recipients a worker has claimed so far."""
    return count_in(sessions, batch_id, R.SENDING, R.SENT, R.DELIVERED, R.UNKNOWN)


def callbacks_delivered(sessions: sessionmaker[Session], edge: Edge, batch_ids: list[str]) -> bool:
    """Each status change has its callback, recorded delivered, and its webhook-id arrived."""
    with sessions() as session:
        events = session.scalar(
            select(func.count()).select_from(StatusEvent).where(StatusEvent.batch_id.in_(batch_ids))
        )
    rows = [c for b in batch_ids for c in callbacks(sessions, b)]
    return (
        len(rows) == events
        and all(c.state == "delivered" for c in rows)
        and {c.id for c in rows} <= set(edge.received())
    )


def assert_one_callback_per_change(
    sessions: sessionmaker[Session], edge: Edge, batch_ids: list[str], changes: Counter[str]
) -> None:
    """What arrived (deduplicated by webhook-id): each recipient's changes, once each."""
    ids = {c.id for b in batch_ids for c in callbacks(sessions, b)}
    arrived = [body for wid, body in edge.received().items() if wid in ids]
    seen = Counter((body["messageUuid"], body["status"]) for body in arrived)
    assert max(seen.values()) == 1, [k for k, n in seen.items() if n > 1][:5]
    assert Counter(status for _uuid, status in seen) == changes


def test_a_restart_that_keeps_its_data_loses_nothing_and_sends_nothing_twice(
    api: FlaskClient,
    live: Runtime,
    server: RedisServer,
    edge: Edge,
    restart_settings: Settings,
    logs: Path,
) -> None:
    """Redis stops mid-send with callbacks in flight, and comes back with its data."""
    sessions = live.sessions
    ledger = Simulator(redis_client=live.redis, rules={})
    tenant = Tenant(sessions, rate=40)  # 200 recipients: about five seconds of sending
    # Callback lanes are mid-POST when Redis goes, and finish while it is down.
    edge.answering.clear()
    with kept(restart_settings, logs, name="send-kept", concurrency=2) as worker:
        batch_id = send(api, tenant, numbers("+44770058", 200), callback=edge.url("/hooks"))
        wait_for(lambda: edge.held, timeout=30)
        wait_for(lambda: handed_over(sessions, batch_id) >= 20, timeout=60)
        live.redis.set(MARKER, b"1")

        server.stop()
        waiting = count_in(sessions, batch_id, R.QUEUED)
        edge.answering.set()
        server.start(keep_data=True)

        assert waiting > 0  # the outage came mid-send
        assert live.redis.get(MARKER) == b"1"  # the append-only file brought the data back
        wait_for(lambda: "Connection to broker lost" in worker.output(), timeout=30)
        wait_for(lambda: in_states(sessions, [batch_id], {R.DELIVERED}), timeout=90)
        wait_for(lambda: callbacks_delivered(sessions, edge, [batch_id]), timeout=60)
    rows = recipients(sessions, batch_id)
    handed = ledger.handoffs()
    assert [handed.get(f"{r.id}:sms") for r in rows] == [1] * 200
    changes = Counter({"queued": 200, "sent": 200, "delivered": 200})
    assert_one_callback_per_change(sessions, edge, [batch_id], changes)


def test_a_restart_that_loses_the_data_loses_nothing_and_sends_nothing_twice(
    api: FlaskClient,
    live: Runtime,
    server: RedisServer,
    edge: Edge,
    restart_settings: Settings,
    logs: Path,
) -> None:
    """The harshest case: queues, unacked and ETA tasks, limiter, wake-ups all gone.

    RCS goes to ``edge`` through the http provider, which counts every hand-off
    itself (the simulator's ledger would go with Redis). The carrier sends no
    receipts: every message it took ends ``unknown`` at the receipt deadline.
    """
    sessions = live.sessions
    tenant = Tenant(sessions, rate=40)
    hooks = edge.url("/hooks")
    # A sent message with no receipt (the carrier sends none) ends unknown this soon (the
    # receipts sweep runs every 5 s: each second here can cost a sweep's wait).
    deadline = restart_settings.replace(receipt_deadline=2)
    with kept(deadline, logs, name="send-lost", concurrency=2) as worker:
        now_id = send(api, tenant, numbers("+44770059", 150), channel="rcs", callback=hooks)
        # Due in a few seconds: its dispatch waits in Redis as an ETA task.
        soon = (utcnow() + timedelta(seconds=4)).isoformat() + "Z"
        later_id = send(
            api, tenant, numbers("+44770069", 20), channel="rcs", callback=hooks, send_at=soon
        )
        batches = [now_id, later_id]
        wait_for(lambda: handed_over(sessions, now_id) >= 20, timeout=60)
        live.redis.set(MARKER, b"1")

        server.stop()
        waiting = count_in(sessions, now_id, R.QUEUED)
        server.start(keep_data=False)

        assert waiting > 0  # the outage came mid-send
        assert live.redis.get(MARKER) is None  # nothing came back
        wait_for(lambda: "Connection to broker lost" in worker.output(), timeout=30)
        wait_for(lambda: in_states(sessions, batches, {R.UNKNOWN}), timeout=120)
        wait_for(lambda: callbacks_delivered(sessions, edge, batches), timeout=60)
    rows = [r for b in batches for r in recipients(sessions, b)]
    handed = edge.handoffs()
    assert [handed[f"{r.id}:rcs"] for r in rows] == [1] * 170
    changes = Counter({"queued": 170, "sent": 170, "unknown": 170})
    assert_one_callback_per_change(sessions, edge, batches, changes)
