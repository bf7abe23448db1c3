"""Webhooks end to end: real send and callback workers, beat, Redis, and a real receiver.

The receiver is an HTTP server on 127.0.0.1 that verifies every request's Standard
Webhooks signature with the tenant's secret and logs what it answered. Tests compare
that log with the callback rows, so "one callback per transition", "retries reuse the
webhook-id" and "a killed worker loses nothing" are checked, not assumed.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from dispatcher.batches.models import Batch, StatusEvent
from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.engine import scheduling
from dispatcher.runtime import Runtime
from dispatcher.states import BatchStatus
from dispatcher.webhooks import scheduling as webhooks
from dispatcher.webhooks import sign
from dispatcher.webhooks.models import Callback
from tests.engine import system
from tests.factories import Tenant
from tests.helpers import RecordingPublisher, in_thread, wait_for
from tests.helpers.reads import callbacks

pytestmark = pytest.mark.system
HELD = -1  # the status logged for a request that was held and never answered


# --- the receiver ----------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    """One request as the receiver saw it, and what it answered."""

    path: str
    webhook_id: str
    payload: dict[str, Any]
    verified: bool
    status: int
    arrived: float = 0.0  # time.time() when the request came in


@dataclass
class Route:
    """How one callback URL behaves."""

    secret: str
    fail_first: int = 0  # answer 500 to this many requests first
    failing: bool = False  # answer 500 while set
    hold: threading.Event | None = None  # keep the first request open until set
    arrived: threading.Event = field(default_factory=threading.Event)
    calls: int = 0


class Receiver(ThreadingHTTPServer):
    """A webhook receiver with one route per test, verifying every signature."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.routes: dict[str, Route] = {}
        self.hits: list[Hit] = []

    def route(self, secret: str, **behaviour: Any) -> tuple[str, Route]:
        """A fresh callback URL and its behaviour."""
        path = f"/hooks/{uuid.uuid4().hex}"
        route = Route(secret=secret, **behaviour)
        with self.lock:
            self.routes[path] = route
        return f"http://127.0.0.1:{self.server_address[1]}{path}", route

    def recover(self, route: Route) -> None:
        with self.lock:
            route.failing = False

    def hits_for(self, url: str) -> list[Hit]:
        path = urlsplit(url).path
        with self.lock:
            return [h for h in self.hits if h.path == path]


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        srv = self.server
        route = srv.routes.get(self.path)
        if route is None:
            self._reply(404)
            return
        try:
            sign.verify(secret=route.secret, headers=dict(self.headers.items()), body=body)
            verified = True
        except sign.InvalidSignature:
            verified = False
        try:
            payload = json.loads(body)
        except ValueError:
            payload = {}
        with srv.lock:
            route.calls += 1
            held = route.hold is not None and route.calls == 1
            if held:
                status = HELD
            elif not verified:
                status = 401
            elif route.failing or route.calls <= route.fail_first:
                status = 500
            else:
                status = 200
            webhook_id = self.headers.get("webhook-id", "")
            srv.hits.append(Hit(self.path, webhook_id, payload, verified, status, time.time()))
        if held:
            assert route.hold is not None
            route.arrived.set()
            route.hold.wait(timeout=60)
            # The worker that sent it was killed meanwhile: nobody is left to answer.
            self.close_connection = True
            return
        self._reply(status)

    def _reply(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


# --- fixtures --------------------------------------------------------------------------


class CallbackWorkers:
    """The callback pool: one real worker consuming ``callbacks``, which a test may kill."""

    def __init__(self, settings: Settings, logs: Path, processes: system.Together) -> None:
        self.settings, self.logs, self.processes = settings, logs, processes
        self.started = 0
        self.proc: system.Process | None = None

    def start(self) -> system.Process:
        self.started += 1
        name = "callbacks" if self.started == 1 else f"callbacks{self.started}"
        self.proc = self.processes.add(
            system.worker_process(self.settings, self.logs, name=name, queues="callbacks")
        )
        return self.proc


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    srv = Receiver()

    def release() -> None:
        for route in srv.routes.values():
            if route.hold is not None:
                route.hold.set()

    with in_thread(srv, before_stop=release):
        yield srv


@pytest.fixture(scope="module")
def callback_workers(
    sys_settings: Settings, logs: Path, module_processes: system.Together
) -> CallbackWorkers:
    workers = CallbackWorkers(sys_settings, logs, module_processes)
    workers.start()
    return workers


@pytest.fixture(scope="module", autouse=True)
def processes(
    send_worker: system.Process, scheduler: system.Process, callback_workers: CallbackWorkers
) -> Iterator[None]:
    yield


@pytest.fixture(scope="module")
def api(live: Runtime) -> FlaskClient:
    return create_app(live.settings, runtime=live).test_client()


# --- helpers ---------------------------------------------------------------------------


def numbers(prefix: str, count: int) -> list[str]:
    width = 12 - len(prefix.lstrip("+"))
    return [f"{prefix}{i:0{width}d}" for i in range(count)]


def send(api: FlaskClient, tenant: Tenant, destinations: list[str], **extra: Any) -> str:
    body = {"from": "Dispatcher", "message": "hello", "destinations": destinations, **extra}
    reply = api.post("/batch", json=body, headers=tenant.auth)
    assert reply.status_code == 200, reply.get_json()
    return str(reply.get_json()["identifier"])


def later() -> str:
    """A send_at beyond the scheduling horizon: the batch waits in the database."""
    return (utcnow() + timedelta(hours=1)).isoformat() + "Z"


def event_count(sessions: sessionmaker[Session], batch_id: str) -> int:
    with sessions() as session:
        count = session.scalar(
            select(func.count()).select_from(StatusEvent).where(StatusEvent.batch_id == batch_id)
        )
    return int(count or 0)


def all_delivered(
    sessions: sessionmaker[Session], receiver: Receiver, url: str, batch_id: str, count: int
) -> bool:
    """``count`` callbacks exist for the batch, each delivered and answered 200."""
    rows = callbacks(sessions, batch_id)
    answered = {h.webhook_id for h in receiver.hits_for(url) if h.status == 200}
    return (
        len(rows) == count
        and all(r.state == "delivered" for r in rows)
        and answered == {r.id for r in rows}
    )


def assert_once_each(receiver: Receiver, url: str, rows: list[Callback]) -> list[Hit]:
    """Every hit verified; each callback answered 200 exactly once; returns the 200 hits."""
    hits = receiver.hits_for(url)
    assert hits and all(h.verified for h in hits), [h for h in hits if not h.verified]
    ok = [h for h in hits if h.status == 200]
    assert Counter(h.webhook_id for h in ok) == Counter({r.id: 1 for r in rows})
    for h in ok:
        row = next(r for r in rows if r.id == h.webhook_id)
        assert h.payload == row.payload  # what was stored at the transition, unchanged
        assert h.payload["batchUuid"] == row.batch_id
        assert h.payload["type"] == f"message.{h.payload['status']}" == row.event_type
    return ok


def statuses_by_number(hits: list[Hit]) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = {}
    for h in hits:
        out.setdefault(h.payload["to"], Counter())[h.payload["status"]] += 1
    return out


# --- one callback per transition -------------------------------------------------------


def test_a_mixed_batch_reports_each_transition_once_signed(
    api: FlaskClient, live_sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    tenant = Tenant(live_sessions)
    url, _route = receiver.route(tenant.webhook_secret)
    fallback = numbers("+44770090", 2)  # unreachable on rcs: sent over sms
    normal = numbers("+44770057", 2)
    invalid = numbers("+44770080", 1)  # refused for the recipient: failed, never sent
    undeliverable = numbers("+44770060", 1)  # accepted, then a failed receipt
    batch_id = send(
        api,
        tenant,
        fallback + normal + invalid + undeliverable,
        channel="rcs",
        fallback_channels=["sms"],
        callback=url,
    )
    delivered = Counter(["queued", "sent", "delivered"])
    expected = {
        **{n: delivered for n in fallback + normal},
        invalid[0]: Counter(["queued", "failed"]),
        undeliverable[0]: Counter(["queued", "sent", "failed"]),
    }
    total = sum(c.total() for c in expected.values())

    wait_for(
        lambda: all_delivered(live_sessions, receiver, url, batch_id, total),
        timeout=30,
    )

    rows = callbacks(live_sessions, batch_id)
    ok = assert_once_each(receiver, url, rows)
    assert all(h.status == 200 for h in receiver.hits_for(url))  # nothing needed a retry
    assert statuses_by_number(ok) == expected
    assert event_count(live_sessions, batch_id) == total  # one callback per status event
    sent_on = {h.payload["to"]: h.payload["channel"] for h in ok if h.payload["status"] == "sent"}
    assert sent_on == {
        **dict.fromkeys(fallback, "sms"),
        **dict.fromkeys(normal + undeliverable, "rcs"),
    }
    failed = {h.payload["to"]: h.payload["error"] for h in ok if h.payload["status"] == "failed"}
    assert failed[invalid[0]]["code"] == "invalid"
    assert failed[undeliverable[0]]["code"] == "undeliverable"


def test_a_cancelled_batch_reports_one_cancelled_callback_per_recipient(
    api: FlaskClient, live_sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    tenant = Tenant(live_sessions)
    url, _route = receiver.route(tenant.webhook_secret)
    destinations = numbers("+44770058", 3)
    batch_id = send(api, tenant, destinations, callback=url, send_at=later())

    reply = api.delete(f"/batch/{batch_id}", headers=tenant.auth)

    assert reply.status_code == 200 and reply.get_json()["cancelledCount"] == 3
    wait_for(lambda: all_delivered(live_sessions, receiver, url, batch_id, 3), timeout=20)
    ok = assert_once_each(receiver, url, callbacks(live_sessions, batch_id))
    assert statuses_by_number(ok) == {n: Counter(["cancelled"]) for n in destinations}


def test_an_expired_batch_reports_one_expired_callback_per_recipient(
    api: FlaskClient, live_sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    tenant = Tenant(live_sessions)
    url, _route = receiver.route(tenant.webhook_secret)
    destinations = numbers("+44770059", 3)
    batch_id = send(api, tenant, destinations, callback=url, send_at=later())

    # Its expire_at passes (the clock cannot move, the data can); the scheduler's
    # expire task runs every 30 s, so run its service here as that task would.
    with transaction(live_sessions) as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        batch.expire_at = utcnow() - timedelta(seconds=1)
        session.flush()
        scheduling.expire_due(session=session, now=utcnow())

    wait_for(lambda: all_delivered(live_sessions, receiver, url, batch_id, 3), timeout=20)
    ok = assert_once_each(receiver, url, callbacks(live_sessions, batch_id))
    assert statuses_by_number(ok) == {n: Counter(["expired"]) for n in destinations}
    with live_sessions() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None and batch.status == BatchStatus.EXPIRED


# --- retries ---------------------------------------------------------------------------


def test_a_receiver_that_recovers_gets_every_callback_under_its_first_webhook_id(
    api: FlaskClient, live_sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    tenant = Tenant(live_sessions)
    failures = 3  # fewer than the schedule's retries, whoever gets them
    url, _route = receiver.route(tenant.webhook_secret, fail_first=failures)
    batch_id = send(api, tenant, numbers("+44770040", 2), callback=url)
    total = 2 * 3  # queued, sent, delivered for each

    wait_for(lambda: all_delivered(live_sessions, receiver, url, batch_id, total), timeout=30)

    rows = callbacks(live_sessions, batch_id)
    ok = assert_once_each(receiver, url, rows)
    hits = receiver.hits_for(url)
    assert [h.status for h in hits].count(500) == failures
    # Retries reused the webhook-id: as many ids as events, none a new event.
    assert len({h.webhook_id for h in hits}) == total == event_count(live_sessions, batch_id)
    assert len({(h.payload["messageUuid"], h.payload["status"]) for h in ok}) == total
    for h in hits:
        assert h.payload == next(o.payload for o in ok if o.webhook_id == h.webhook_id)
    assert sum(r.attempts for r in rows) == len(hits)


def test_a_receiver_that_never_recovers_ends_dead_and_a_replay_delivers(
    api: FlaskClient,
    live_sessions: sessionmaker[Session],
    receiver: Receiver,
    sys_settings: Settings,
) -> None:
    tenant = Tenant(live_sessions)
    url, route = receiver.route(tenant.webhook_secret, failing=True)
    batch_id = send(api, tenant, numbers("+44770041", 1), callback=url)
    attempts = 1 + len(sys_settings.callback_retry_schedule)

    def all_dead() -> bool:
        rows = callbacks(live_sessions, batch_id)
        return len(rows) == 3 and all(r.state == "dead" for r in rows)

    wait_for(all_dead, timeout=30)

    rows = callbacks(live_sessions, batch_id)
    assert all(r.attempts == attempts and r.last_status == 500 for r in rows)
    hits = receiver.hits_for(url)
    assert Counter(h.webhook_id for h in hits) == Counter({r.id: attempts for r in rows})
    assert all(h.verified and h.status == 500 for h in hits)
    listed = api.get("/callbacks?state=dead", headers=tenant.auth).get_json()
    assert {c["id"] for c in listed["callbacks"]} == {r.id for r in rows}

    receiver.recover(route)
    for r in rows:
        reply = api.post(f"/callbacks/{r.id}/retry", headers=tenant.auth)
        assert reply.status_code == 200, reply.get_json()

    wait_for(lambda: all_delivered(live_sessions, receiver, url, batch_id, 3), timeout=20)
    rows = callbacks(live_sessions, batch_id)
    assert_once_each(receiver, url, rows)
    assert all(r.attempts == attempts + 1 for r in rows)
    assert api.post(f"/callbacks/{rows[0].id}/retry", headers=tenant.auth).status_code == 409


# --- refusals and failures -------------------------------------------------------------


def test_a_private_callback_url_is_refused_at_intake(
    live_sessions: sessionmaker[Session], sys_settings: Settings, receiver: Receiver
) -> None:
    tenant = Tenant(live_sessions)
    publisher = RecordingPublisher()
    strict = Runtime(sys_settings.replace(callback_allowlist=()), publisher)
    try:
        client = create_app(strict.settings, runtime=strict).test_client()
        loopback, _route = receiver.route(tenant.webhook_secret)
        for url in ("http://10.0.0.1/x", "http://192.168.1.10/hook", loopback):
            reply = client.post(
                "/batch",
                json={"from": "Dispatcher", "message": "hi", "destinations": ["+447700420000"]}
                | {"callback": url},
                headers=tenant.auth,
            )
            assert reply.status_code == 400, reply.get_json()
            assert "callback" in reply.get_json()["message"]
            assert "allow-list" in reply.get_json()["message"]
    finally:
        strict.dispose()
    with live_sessions() as session:
        stored = session.scalar(
            select(func.count()).select_from(Batch).where(Batch.account_id == tenant.id)
        )
    assert stored == 0 and publisher.messages == []
    assert receiver.hits_for(loopback) == []


def test_a_callback_worker_killed_mid_delivery_loses_nothing(
    api: FlaskClient,
    live_sessions: sessionmaker[Session],
    receiver: Receiver,
    sys_settings: Settings,
    callback_workers: CallbackWorkers,
) -> None:
    tenant = Tenant(live_sessions)
    hold = threading.Event()
    url, route = receiver.route(tenant.webhook_secret, hold=hold)
    batch_id = send(api, tenant, numbers("+44770043", 1), callback=url)

    assert route.arrived.wait(timeout=20), "no callback reached the receiver"
    (held,) = [h for h in receiver.hits_for(url) if h.status == HELD]
    doomed = callback_workers.proc
    assert doomed is not None
    doomed.kill_group(signal.SIGKILL)  # main process and pool child, mid-POST
    doomed.proc.wait(timeout=10)
    hold.set()

    with transaction(live_sessions) as session:
        row = session.get(Callback, held.webhook_id)
        assert row is not None and (row.state, row.attempts) == ("delivering", 1)
        # The claim outlives its worker until the lease passes. Rather than wait
        # delivery_lease(settings) (minutes), move the claim time back by that much:
        # the scheduler's promote_callbacks then reclaims it as it would in production.
        row.next_attempt_at -= webhooks.delivery_lease(sys_settings) + timedelta(seconds=1)

    callback_workers.start()

    wait_for(lambda: all_delivered(live_sessions, receiver, url, batch_id, 3), timeout=30)
    rows = callbacks(live_sessions, batch_id)
    assert_once_each(receiver, url, rows)
    again = [h for h in receiver.hits_for(url) if h.webhook_id == held.webhook_id]
    assert [h.status for h in again] == [HELD, 200]  # the same webhook-id, redelivered
    assert {r.id: r.attempts for r in rows} == {
        r.id: 2 if r.id == held.webhook_id else 1 for r in rows
    }


# --- isolation ------------------------------------------------------------------------


def lag_of(hit: Hit) -> float:
    """Seconds from the status change (the payload's timestamp) to the POST's arrival."""
    at = datetime.strptime(hit.payload["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return hit.arrived - at.timestamp()


def test_a_blackholed_endpoint_does_not_delay_another_tenants_callbacks(
    api: FlaskClient,
    live_sessions: sessionmaker[Session],
    receiver: Receiver,
    sys_settings: Settings,
) -> None:
    """Account A's endpoint accepts TCP and never answers while 1,000 recipients' events
    (3,000 callbacks) go to it; account B's callbacks still arrive promptly, and none of
    A's is lost. (Last in the module: A's callbacks keep retrying afterwards.)"""
    slow, fast = Tenant(live_sessions, "slow"), Tenant(live_sessions, "fast")
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(128)  # the kernel accepts; nothing ever reads or answers
        blackhole = f"http://127.0.0.1:{hole.getsockname()[1]}/hook"
        flood = send(api, slow, numbers("+44770061", 1000), callback=blackhole)

        def a_is_stuck() -> bool:
            with live_sessions() as session:
                return bool(
                    session.scalar(
                        select(func.count())
                        .select_from(Callback)
                        .where(Callback.batch_id == flood, Callback.state == "delivering")
                    )
                )

        wait_for(a_is_stuck, timeout=30)  # A's first POSTs are hanging in the blackhole
        hits: list[Hit] = []
        for i in range(3):  # one after another, while A's backlog is being worked through
            url, _route = receiver.route(fast.webhook_secret)
            batch_id = send(api, fast, numbers(f"+4477005{i}", 1), callback=url)

            def arrived(url: str = url, batch_id: str = batch_id) -> bool:
                return all_delivered(live_sessions, receiver, url, batch_id, 3)

            wait_for(arrived, timeout=30)
            hits += receiver.hits_for(url)
        lags = [lag_of(h) for h in hits]
        assert len(hits) == 9 and all(h.status == 200 for h in hits)
        # Loosely (shared CI machines): bench/callbacks_isolation.py measures it exactly.
        assert max(lags) < 10.0, sorted(lags)

        wait_for(lambda: len(callbacks(live_sessions, flood)) == 3000, timeout=60)
        rows = callbacks(live_sessions, flood)
        states = Counter(r.state for r in rows)
        # Kept, not dropped: all 3,000 rows are there, none delivered (the blackhole
        # never answers), dead only once the retry schedule ran out; and the breaker
        # held the endpoint, so it got a handful of attempts, not thousands.
        assert set(states) <= {"pending", "delivering", "dead"}, states
        attempts = 1 + len(sys_settings.callback_retry_schedule)
        assert all(r.attempts == attempts for r in rows if r.state == "dead")
        # (rows in 'delivering' count their current claim; lanes give back what they
        # did not try).
        assert sum(r.attempts for r in rows if r.state != "delivering") < 50
