"""Callback delivery, scheduling and queries against SQLite/PostgreSQL, real Redis and a
real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import outbox
from dispatcher.accounts import service as accounts
from dispatcher.config import Settings
from dispatcher.db import make_engine, make_session_factory, new_id, transaction, utcnow
from dispatcher.devserver import redis_server_command
from dispatcher.errors import Conflict, NotFound, ValidationError
from dispatcher.models import Base
from dispatcher.webhooks import delivery, queries, scheduling, sign
from dispatcher.webhooks.deliver import DeliveryResult, WebhookSender
from dispatcher.webhooks.limits import EndpointGate, endpoint_key
from dispatcher.webhooks.models import Callback, Endpoint
from tests.helpers import free_port, in_thread, wait_for, wait_for_redis
from tests.helpers.races import listening

SCHEDULE = (1.0, 2.0, 3.0)
JITTER = 0.1  # next_delay's default jitter fraction
WAIT = 5.0  # deadline for conditions awaited across threads


# --- a real receiver -------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    raw: bool = False  # send body as-is, no status line: a non-HTTP service


@dataclass
class Seen:
    """One request as the receiver saw it, with the secrets its signature verified under."""

    path: str
    headers: dict[str, str]
    body: bytes
    verified_with: list[str]
    status: int


class Receiver(ThreadingHTTPServer):
    """Answers scripted replies per path (then 200) and verifies every signature."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.scripts: dict[str, list[Reply]] = {}
        self.seen: list[Seen] = []
        self.secrets: list[str] = []
        self.arrived = threading.Event()
        self.release = threading.Event()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def script(self, path: str, *replies: Reply) -> None:
        with self.lock:
            self.scripts[path] = list(replies)

    def requests(self, path: str | None = None) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if path is None or s.path == path]


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        srv = self.server
        verified = []
        for secret in srv.secrets:
            try:
                sign.verify(secret=secret, headers=headers, body=body)
            except sign.InvalidSignature:
                continue
            verified.append(secret)
        if self.path == "/slow":
            srv.arrived.set()
            srv.release.wait(timeout=WAIT)
        with srv.lock:
            script = srv.scripts.get(self.path) or []
            reply = script.pop(0) if script else Reply(200, body=b"ok")
            srv.seen.append(Seen(self.path, headers, body, verified, reply.status))
        if reply.raw:
            self.wfile.write(reply.body)
            self.close_connection = True
            return
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    srv = Receiver()
    with in_thread(srv, before_stop=srv.release.set):
        yield srv


# --- database, clock, publisher --------------------------------------------------------


class Clock:
    """A settable naive-UTC clock."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Recorder:
    """A publisher that keeps what it was given."""

    def __init__(self) -> None:
        self.messages: list[outbox.Message] = []

    def publish(self, messages: list[outbox.Message | outbox.Revoke]) -> None:
        self.messages.extend(m for m in messages if isinstance(m, outbox.Message))

    def callback_ids(self) -> list[list[str]]:
        return [m.kwargs["callback_ids"] for m in self.messages]


@dataclass
class Env:
    factory: sessionmaker[Session]
    settings: Settings
    clock: Clock
    published: Recorder
    account_id: str
    secret: str
    gate: EndpointGate

    def deliver(
        self, sender: WebhookSender, *ids: str, gate: EndpointGate | None = None
    ) -> dict[str, int]:
        """The task's counts (those not zero), with this env's gate or ``gate``."""
        counts = delivery.deliver(
            factory=self.factory,
            settings=self.settings,
            sender=sender,
            gate=gate or self.gate,
            callback_ids=list(ids),
            clock=self.clock,
        )
        return {k: v for k, v in counts.items() if v}

    def get(self, callback_id: str) -> Callback:
        with self.factory() as session:
            row = session.get(Callback, callback_id)
            assert row is not None
            return row

    def endpoint(self, url: str, account_id: str | None = None) -> Endpoint | None:
        with self.factory() as session:
            return session.get(Endpoint, (account_id or self.account_id, url))


def _database(kind: str, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """A database URL and engine options: SQLite in tmp_path, or a fresh PostgreSQL schema."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'dispatcher.db'}", {}
    url = os.environ.get("DISPATCHER_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but DISPATCHER_TEST_POSTGRES_URL is not set")
        pytest.skip("no PostgreSQL for this run (make test starts one when binaries exist)")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    return url, {"connect_args": {"options": f"-csearch_path={schema}"}, "_schema": schema}


@pytest.fixture(params=["sqlite", "postgres"])
def env(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str) -> Iterator[Env]:
    url, options = _database(request.param, tmp_path)
    schema = options.pop("_schema", None)
    settings = Settings(
        var_dir=str(tmp_path),
        database_url=url,
        callback_retry_schedule=SCHEDULE,
        callback_disable_after=3600.0,
        callback_batch_size=2,
        schedule_horizon=300.0,
        requeue_after=600.0,
        # Tests read outcomes from deliver()'s counts: let it wait for its POSTs.
        callback_task_wait=30.0,
    )
    engine = make_engine(settings.database_url, **options)
    if schema is not None:
        with engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    Base.metadata.create_all(engine)
    factory = make_session_factory(engine)
    published = Recorder()
    outbox.install(factory, published)
    with transaction(factory) as session:
        account = accounts.create_account(session=session, name="acme")
    client = redis.Redis.from_url(redis_url)
    gate = delivery.gate_for(redis_client=client, settings=settings)
    try:
        yield Env(factory, settings, Clock(), published, account.id, account.webhook_secret, gate)
    finally:
        client.close()
        if schema is not None:
            with engine.begin() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


@pytest.fixture
def sender() -> Iterator[WebhookSender]:
    with WebhookSender(allow=("127.0.0.1",), connect_timeout=2.0, read_timeout=WAIT) as s:
        yield s


def add_account(env: Env, name: str) -> str:
    with transaction(env.factory) as session:
        return accounts.create_account(session=session, name=name).id


def add_callback(env: Env, url: str, *, account_id: str | None = None, **values: Any) -> str:
    """Insert a due, pending callback row (as events.record writes them)."""
    now = env.clock.now
    row: dict[str, Any] = {
        "id": new_id(),
        "account_id": account_id or env.account_id,
        "event_type": "message.delivered",
        "url": url,
        "payload": {"type": "message.delivered", "to": "+447700900123", "text": "héllo"},
        "state": "pending",
        "attempts": 0,
        "next_attempt_at": now,
        "enqueued_at": now,
        "created_at": now,
    }
    row.update(values)
    with transaction(env.factory) as session:
        session.add(Callback(**row))
    return str(row["id"])


def assert_delay(row: Callback, start: datetime, expected: float) -> None:
    """next_attempt_at is ``expected`` seconds after ``start``, within the jitter."""
    assert row.state == "pending" and row.enqueued_at is None
    waited = (row.next_attempt_at - start).total_seconds()
    assert expected * (1 - JITTER) <= waited <= expected * (1 + JITTER)


# --- delivery --------------------------------------------------------------------------


def test_success_is_delivered_signed_with_every_active_secret(
    env: Env, receiver: Receiver, sender: WebhookSender
) -> None:
    with transaction(env.factory) as session:
        rotated = accounts.rotate_webhook_secret(session=session, account_id=env.account_id)
        receiver.secrets = [rotated.webhook_secret, env.secret]
    cid = add_callback(env, receiver.url("/hook"))

    assert env.deliver(sender, cid) == {"delivered": 1}

    [seen] = receiver.requests()
    assert seen.headers["webhook-id"] == cid
    assert seen.verified_with == receiver.secrets  # both signatures during the rotation
    assert seen.body == delivery.body_of(env.get(cid).payload)
    assert seen.body == '{"text":"héllo","to":"+447700900123","type":"message.delivered"}'.encode()
    row = env.get(cid)
    assert (row.state, row.attempts, row.last_status, row.last_error) == ("delivered", 1, 200, None)
    assert row.delivered_at == env.clock.now


def test_a_payload_stored_before_it_was_kept_canonical_is_sent_canonical(
    env: Env, receiver: Receiver, sender: WebhookSender
) -> None:
    receiver.secrets = [env.secret]
    cid = add_callback(env, receiver.url("/hook"))
    stored = '{"type": "message.delivered", "to": "+447700900123", "text": "h\\u00e9llo"}'
    with transaction(env.factory) as session:
        # As the generic JSON column wrote payloads: default separators, keys unsorted.
        session.execute(
            text("UPDATE callbacks SET payload = :p WHERE id = :id"), {"p": stored, "id": cid}
        )

    assert env.deliver(sender, cid) == {"delivered": 1}

    [seen] = receiver.requests()
    assert seen.body == '{"text":"héllo","to":"+447700900123","type":"message.delivered"}'.encode()


def test_retries_reuse_webhook_id_follow_schedule_and_deliver_once(
    env: Env, receiver: Receiver, sender: WebhookSender
) -> None:
    receiver.secrets = [env.secret]
    receiver.script("/flaky", Reply(500, body=b"boom"), Reply(502), Reply(500))
    url = receiver.url("/flaky")
    cid = add_callback(env, url)

    for attempt, expected in enumerate(SCHEDULE, start=1):
        assert env.deliver(sender, cid) == {"retry": 1}
        row = env.get(cid)
        assert row.attempts == attempt
        assert_delay(row, env.clock.now, expected)
        endpoint = env.endpoint(url)
        assert endpoint is not None and endpoint.failing_since is not None
        # Not due yet: an early task neither posts nor loses the callback.
        assert env.deliver(sender, cid) == {"not_due": 1}
        assert len(receiver.requests()) == attempt
        env.clock.now = row.next_attempt_at

    assert env.get(cid).last_error == "HTTP 500"
    assert env.deliver(sender, cid) == {"delivered": 1}
    assert env.deliver(sender, cid) == {"skipped": 1}

    seen = receiver.requests()
    assert [s.status for s in seen] == [500, 502, 500, 200]
    assert {s.headers["webhook-id"] for s in seen} == {cid}
    assert len({s.body for s in seen}) == 1
    assert all(s.verified_with == [env.secret] for s in seen)
    assert env.get(cid).state == "delivered"
    endpoint = env.endpoint(url)
    assert endpoint is not None and endpoint.failing_since is None


def test_endpoint_that_never_recovers_goes_dead_then_replays(
    env: Env, receiver: Receiver, sender: WebhookSender
) -> None:
    receiver.script("/down", *[Reply(500, body=b"still down")] * (len(SCHEDULE) + 1))
    cid = add_callback(env, receiver.url("/down"))

    outcomes = []
    for _ in range(len(SCHEDULE) + 1):
        outcomes.append(env.deliver(sender, cid))
        env.clock.now = max(env.clock.now, env.get(cid).next_attempt_at)
    assert outcomes == [{"retry": 1}] * len(SCHEDULE) + [{"dead": 1}]
    row = env.get(cid)
    assert (row.state, row.attempts, row.last_status) == ("dead", 4, 500)
    assert row.last_error == "HTTP 500"  # the body ("still down") is never stored
    env.clock.advance(3600)
    assert env.deliver(sender, cid) == {"skipped": 1}
    assert len(receiver.requests()) == 4

    with transaction(env.factory) as session:
        replayed = queries.retry_callback(
            session=session, account_id=env.account_id, callback_id=cid, now=env.clock.now
        )
        assert replayed.state == "pending"
    assert env.published.callback_ids() == [[cid]]
    assert env.deliver(sender, cid) == {"delivered": 1}
    assert [s.headers["webhook-id"] for s in receiver.requests()] == [cid] * 5
    assert env.get(cid).state == "delivered"


def test_claim_lets_only_one_worker_post(
    env: Env, receiver: Receiver, sender: WebhookSender
) -> None:
    cid = add_callback(env, receiver.url("/slow"))
    results: list[dict[str, int]] = []
    first = threading.Thread(target=lambda: results.append(env.deliver(sender, cid)))
    first.start()
    try:
        assert receiver.arrived.wait(timeout=WAIT), "first worker never posted"
        # A redelivered task while the first POST is in flight finds it claimed.
        assert env.deliver(sender, cid, cid) == {"skipped": 1}
        assert env.get(cid).state == "delivering"
    finally:
        receiver.release.set()
        first.join(timeout=WAIT)
    assert results == [{"delivered": 1}]
    assert env.deliver(sender, cid) == {"skipped": 1}
    assert len(receiver.requests()) == 1


def test_racing_workers_post_each_callback_once(
    env: Env, receiver: Receiver, sender: WebhookSender
) -> None:
    ids = [add_callback(env, receiver.url("/hook")) for _ in range(5)]
    start = threading.Barrier(6)
    results: list[dict[str, int]] = []

    def worker() -> None:
        start.wait(timeout=WAIT)
        results.append(env.deliver(sender, *ids))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=4 * WAIT)
    assert len(results) == 6
    assert sum(r.get("delivered", 0) for r in results) == 5
    assert sorted(s.headers["webhook-id"] for s in receiver.requests()) == sorted(ids)


class PausedAfterAcquire:
    """A gate that holds its task between taking the endpoint's slots and claiming."""

    def __init__(self, gate: EndpointGate) -> None:
        self.gate, self.acquired, self.go = gate, threading.Event(), threading.Event()

    def acquire(self, key: str, lanes: int) -> Any:
        grant = self.gate.acquire(key, lanes)
        self.acquired.set()
        assert self.go.wait(timeout=WAIT)
        return grant

    def __getattr__(self, name: str) -> Any:
        return getattr(self.gate, name)


def test_a_task_without_a_slot_does_not_delay_the_one_that_has_it(
    env: Env, receiver: Receiver, sender: WebhookSender, redis_url: str
) -> None:
    """Two tasks for the same callbacks (a sweep's re-publish overlapping the first): the
    one that took the endpoint's only slot is about to claim them when the other, left
    without a slot, defers them. The deferral moves them out of the first task's reach:
    nobody POSTs them until the deferral is up (up to 15 s on a busy endpoint), though the
    slot was there. A deferral is not an attempt: the task holding the slot claims them."""
    ids = [add_callback(env, receiver.url("/hook")) for _ in range(3)]
    client = redis.Redis.from_url(redis_url)
    one_slot = delivery.gate_for(
        redis_client=client, settings=env.settings.replace(callback_endpoint_concurrency=1)
    )
    paused = PausedAfterAcquire(one_slot)
    first: list[dict[str, int]] = []
    holder = threading.Thread(
        target=lambda: first.append(env.deliver(sender, *ids, gate=paused))  # type: ignore[arg-type]
    )
    holder.start()
    try:
        assert paused.acquired.wait(timeout=WAIT)
        assert env.deliver(sender, *ids, gate=one_slot) == {"deferred": 3}
    finally:
        paused.go.set()
        holder.join(timeout=4 * WAIT)
        client.close()
    assert first == [{"delivered": 3}]
    assert sorted(s.headers["webhook-id"] for s in receiver.requests()) == sorted(ids)
    # The deferred task's successor finds them delivered: nothing goes out twice.
    env.clock.now += timedelta(seconds=60)
    assert env.deliver(sender, *ids) == {"skipped": 3}
    assert len(receiver.requests()) == 3


def test_failing_endpoints_are_locked_in_one_order_by_every_task(
    env: Env, receiver: Receiver, sender: WebhookSender
) -> None:
    """Recording failures locks each failing endpoint's row (FOR UPDATE on PostgreSQL)
    until the commit. Two tasks recording failures of the same endpoints must lock them
    in the same order, or each holds a row the other waits for: a deadlock, and the
    aborted task's outcomes are lost (those callbacks are POSTed again after the lease).
    A set's order differs between worker processes (string hashes are seeded per
    process): the rows go in (account, url) order."""
    paths = [f"/down-{i}" for i in range(6)]
    for path in paths:
        receiver.script(path, Reply(500))
    ids = [add_callback(env, receiver.url(path)) for path in paths]
    urls = {receiver.url(path) for path in paths}
    locked: list[str] = []
    engine = env.factory.kw["bind"]

    def note(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().startswith("SELECT") and "FROM callback_endpoints" in statement:
            values = params.values() if isinstance(params, dict) else params
            locked.extend(v for v in values if v in urls)

    with listening(engine, ("before_cursor_execute", note)):
        assert env.deliver(sender, *ids) == {"retry": 6}
    first = list(dict.fromkeys(locked))  # each row is read again once it is created
    assert sorted(first) == sorted(urls)
    assert first == sorted(first)


@dataclass
class Race:
    """What two tasks run at once returned, raised, and the deadlocks PostgreSQL broke."""

    results: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)
    deadlocks: list[BaseException] = field(default_factory=list)


def race(env: Env, sender: WebhookSender, tasks: dict[str, list[str]], *hooks: Any) -> Race:
    """Run deliver() for each of ``tasks`` in a thread named task-<name>, with the
    engine events ``hooks`` (name, function) listened to meanwhile."""
    engine = env.factory.kw["bind"]
    race = Race()

    def failed(context: Any) -> None:
        if getattr(context.original_exception, "sqlstate", None) == "40P01":
            race.deadlocks.append(context.original_exception)

    def task(name: str, ids: list[str]) -> None:
        try:
            race.results[name] = env.deliver(sender, *ids)
        except BaseException as exc:
            race.errors[name] = exc

    with listening(engine, *hooks, ("handle_error", failed)):
        threads = [
            threading.Thread(target=task, args=(name, ids), name=f"task-{name}")
            for name, ids in tasks.items()
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=6 * WAIT)
    return race


def test_disabling_an_endpoint_while_another_task_claims_its_callbacks_never_fails_a_task(
    env: Env, receiver: Receiver, sender: WebhookSender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: task A records failures of endpoints E and F; E has failed long
    enough, so A disables it and holds its pending callbacks (row locks), then locks F's
    row. Task B has just recorded failures of F (F's row locked) and claims E's pending
    callback e1 in the same transaction. A waits for B's F row, B for A's e1: a deadlock,
    and PostgreSQL aborts one of the transactions. The victim runs its transaction again
    (rolled back whole, it is safe to), so neither task fails and nothing is left
    'delivering'. The statements are interleaved by hooks: the cycle forms every run."""
    engine = env.factory.kw["bind"]
    if engine.dialect.name != "postgresql":
        pytest.skip("row locks taken in two orders deadlock on PostgreSQL only")
    monkeypatch.setattr(delivery, "ROUND", 2)  # B claims e1 in its second round
    env.settings = env.settings.replace(callback_disable_after=10.0)
    e_url, f_url = receiver.url("/e"), receiver.url("/f")  # E's row is locked first
    receiver.script("/e", Reply(500))
    receiver.script("/f", Reply(500), Reply(500), Reply(500))
    with transaction(env.factory) as session:
        failing = env.clock.now - timedelta(seconds=11)
        session.add(Endpoint(account_id=env.account_id, url=e_url, failing_since=failing))
        session.add(Endpoint(account_id=env.account_id, url=f_url))
    e0, e1, f0, f1, f2 = (add_callback(env, url) for url in (e_url, e_url, f_url, f_url, f_url))
    b_locked_f, a_held_e = threading.Event(), threading.Event()

    def before(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        task = threading.current_thread().name
        if task == "task-a" and "FROM callback_endpoints" in statement:
            assert b_locked_f.wait(timeout=2 * WAIT), "B never locked F's row"
        if task == "task-b" and b_locked_f.is_set() and "attempts=(callbacks.attempts" in statement:
            assert a_held_e.wait(timeout=2 * WAIT), "A never held E's callbacks"  # B claims e1

    def after(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        task = threading.current_thread().name
        if task == "task-b" and "FROM callback_endpoints" in statement and f_url in str(params):
            b_locked_f.set()
        if task == "task-a" and "callbacks.url =" in statement:
            a_held_e.set()

    raced = race(
        env,
        sender,
        {"a": [e0, f1], "b": [f0, f2, e1]},
        ("before_cursor_execute", before),
        ("after_cursor_execute", after),
    )
    assert len(raced.deadlocks) == 1  # the cycle formed, and PostgreSQL broke it
    assert raced.errors == {}
    assert sorted(raced.results) == ["a", "b"]
    assert [(env.get(c).state, env.get(c).attempts) for c in (f0, f1, f2)] == [("pending", 1)] * 3
    # B's claim went first (e1 was POSTed: its answer may reset E's failures before A's
    # transaction runs again) or A's hold did (then B found e1 held). E's callbacks are
    # held if and only if A disabled E.
    endpoint = env.endpoint(e_url)
    assert endpoint is not None
    held = endpoint.disabled_at is not None
    assert (env.get(e0).state, env.get(e0).attempts) == ("held" if held else "pending", 1)
    assert env.get(e1).state in (("held", "delivered") if held else ("delivered",))


def test_a_hold_and_a_claim_of_one_endpoints_callbacks_never_fail_a_task(
    env: Env, receiver: Receiver, sender: WebhookSender
) -> None:
    """PostgreSQL, callback rows alone: task B's transaction first moves its callback not
    yet due (e_early) back to the scheduler, then claims its due one (e_due). Task A
    disables the endpoint meanwhile and holds its pending callbacks in one statement,
    which takes e_due's row first (heap order) and waits for e_early's. B's claim then
    waits for e_due's: a deadlock that no endpoint lock order prevents. The victim runs
    its transaction again."""
    engine = env.factory.kw["bind"]
    if engine.dialect.name != "postgresql":
        pytest.skip("row locks taken in two orders deadlock on PostgreSQL only")
    env.settings = env.settings.replace(callback_disable_after=10.0)
    url = receiver.url("/e")
    receiver.script("/e", Reply(500))
    with transaction(env.factory) as session:
        failing = env.clock.now - timedelta(seconds=11)
        session.add(Endpoint(account_id=env.account_id, url=url, failing_since=failing))
    e0 = add_callback(env, url)
    e_due = add_callback(env, url)
    e_early = add_callback(env, url, next_attempt_at=env.clock.now + timedelta(seconds=60))
    b_moved_early = threading.Event()
    a_backend: list[int] = []
    watcher = engine.connect()

    def a_waits() -> bool:
        waiting = "SELECT count(*) FROM pg_locks WHERE pid = :pid AND NOT granted"
        return bool(watcher.scalar(text(waiting), {"pid": a_backend[-1]}))

    def before(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        task = threading.current_thread().name
        if task == "task-a" and "FROM callback_endpoints" in statement:
            a_backend.append(cursor.connection.info.backend_pid)
            assert b_moved_early.wait(timeout=2 * WAIT), "B never moved e_early"
        if task == "task-b" and "attempts=(callbacks.attempts" in statement:
            wait_for(a_waits, timeout=2 * WAIT)  # A holds e_due, waits for e_early

    def after(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        b = threading.current_thread().name == "task-b"
        if b and statement.startswith("UPDATE callbacks") and "next_attempt_at >" in statement:
            b_moved_early.set()  # e_early's row locked until B's commit

    try:
        raced = race(
            env,
            sender,
            {"a": [e0], "b": [e_early, e_due]},
            ("before_cursor_execute", before),
            ("after_cursor_execute", after),
        )
    finally:
        watcher.close()
    assert len(raced.deadlocks) == 1
    assert raced.errors == {}
    assert sorted(raced.results) == ["a", "b"]
    # A's hold went first (B then found e_due held) or B's claim did (e_due POSTed).
    assert [env.get(c).state for c in (e0, e_early)] == ["held", "held"]
    assert env.get(e_due).state in ("held", "delivered")


def test_outcomes_whose_record_fails_are_recorded_soon_not_left_to_the_lease(
    env: Env, receiver: Receiver, sender: WebhookSender
) -> None:
    """The POSTs were made; if the transaction recording their outcomes fails (the
    database busy for a moment, a deadlock), the process keeps the outcomes and records
    them within seconds, instead of leaving the callbacks 'delivering' until the lease
    (minutes) and POSTing them again."""
    ids = [add_callback(env, receiver.url("/hook")) for _ in range(3)]
    calls = 0

    def clock() -> datetime:
        nonlocal calls
        calls += 1
        if calls == 2:  # the look, then the round's record: the database fails there
            raise OperationalError("UPDATE callbacks", {}, Exception("database is locked"))
        return env.clock.now

    with pytest.raises(OperationalError):
        delivery.deliver(
            factory=env.factory,
            settings=env.settings,
            sender=sender,
            gate=env.gate,
            callback_ids=ids,
            clock=clock,
        )
    assert len(receiver.requests("/hook")) == 3
    wait_for(lambda: all(env.get(cid).state == "delivered" for cid in ids), timeout=WAIT)
    assert [env.get(cid).attempts for cid in ids] == [1, 1, 1]


def test_lanes_that_finish_after_the_task_is_interrupted_record_their_outcomes_soon(
    env: Env, receiver: Receiver, sender: WebhookSender
) -> None:
    """Celery's soft time limit is a signal whose handler raises SoftTimeLimitExceeded in
    the task's thread, wherever it is: here, while it waits for its lanes. The exception
    goes on up, and the outcomes of the lanes (handed in before it, or finishing after)
    are still recorded within seconds, not left 'delivering' until the lease (minutes)
    and POSTed again."""
    assert threading.current_thread() is threading.main_thread()  # signals run there
    fast = add_callback(env, receiver.url("/hook"))
    # Another account: an endpoint, and so a lane, of its own.
    slow = add_callback(env, receiver.url("/slow"), account_id=add_account(env, "other"))

    def soft_time_limit(signum: int, frame: Any) -> None:
        raise SoftTimeLimitExceeded()

    def interrupt_once_posted() -> None:
        if receiver.arrived.wait(timeout=WAIT):
            os.kill(os.getpid(), signal.SIGUSR1)  # as billiard's pool signals its child

    previous = signal.signal(signal.SIGUSR1, soft_time_limit)
    interrupter = threading.Thread(target=interrupt_once_posted)
    interrupter.start()
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            env.deliver(sender, fast, slow)
    finally:
        interrupter.join(timeout=WAIT)
        signal.signal(signal.SIGUSR1, previous)
        receiver.release.set()  # the slow lane gets its answer after the task stopped
    wait_for(lambda: all(env.get(cid).state == "delivered" for cid in (fast, slow)), timeout=WAIT)
    assert [env.get(cid).attempts for cid in (fast, slow)] == [1, 1]
    assert sorted(s.path for s in receiver.requests()) == ["/hook", "/slow"]


def test_a_lane_that_fails_midway_records_what_was_answered(
    env: Env, receiver: Receiver, sender: WebhookSender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lane runs in the sender's threads, where an exception is logged, not raised:
    the POSTs it had answers for are recorded at once (not left 'delivering' until the
    lease and POSTed again), and what it did not get to goes back to pending untried."""
    ids = [add_callback(env, receiver.url("/hook")) for _ in range(2)]
    calls = 0
    real = delivery._Collector.moved

    def moved(self: Any, lane: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # both POSTs answered, then the lane fails
            raise RuntimeError("lane failed")
        real(self, lane)

    monkeypatch.setattr(delivery._Collector, "moved", moved)
    assert env.deliver(sender, *ids) == {"delivered": 2}
    assert [(env.get(c).state, env.get(c).attempts) for c in ids] == [("delivered", 1)] * 2
    assert len(receiver.requests("/hook")) == 2


def test_retry_after_on_429_is_honoured(
    env: Env, receiver: Receiver, sender: WebhookSender
) -> None:
    receiver.script("/throttle", Reply(429, {"Retry-After": "3"}, b"slow down"))
    cid = add_callback(env, receiver.url("/throttle"))

    assert env.deliver(sender, cid) == {"retry": 1}
    row = env.get(cid)
    # The schedule alone says ~1 s; the receiver asked for 3 (capped to the schedule's max).
    assert row.next_attempt_at == env.clock.now + timedelta(seconds=3)
    assert (row.last_status, row.last_error) == (429, "HTTP 429")
    env.clock.advance(2.9)
    assert env.deliver(sender, cid) == {"not_due": 1}
    env.clock.advance(0.1)
    assert env.deliver(sender, cid) == {"delivered": 1}
    assert [s.status for s in receiver.requests()] == [429, 200]


def test_last_error_never_holds_what_the_receiver_sent(
    env: Env, receiver: Receiver, sender: WebhookSender
) -> None:
    """last_error reaches the client (lastError), and the receiver may be internal."""
    leak = b"INTERNAL-ONLY secret=hunter2"
    receiver.script(
        "/leak",
        Reply(500, {"X-Internal": "hunter2"}, leak),
        Reply(302, {"Location": "http://10.0.0.1/hunter2"}, leak),
        Reply(0, body=leak + b"\r\n\r\n", raw=True),  # a non-HTTP answer
    )
    cid = add_callback(env, receiver.url("/leak"))
    stored = []
    for _ in range(3):
        assert env.deliver(sender, cid) == {"retry": 1}
        row = env.get(cid)
        stored.append((row.last_status, row.last_error))
        env.clock.now = row.next_attempt_at
    assert stored == [(500, "HTTP 500"), (302, "HTTP 302"), (None, "ConnectionError")]
    with env.factory() as session:
        listed, _ = queries.list_callbacks(session=session, account_id=env.account_id)
    assert [c.last_error for c in listed] == ["ConnectionError"]


@pytest.mark.parametrize(
    ("result", "stored"),
    [
        (DeliveryResult(False, 500, "HTTP 500", None, "INTERNAL-ONLY secret"), "HTTP 500"),
        (DeliveryResult(False, 302, "HTTP 302: redirect not followed", None, "x"), "HTTP 302"),
        (DeliveryResult(False, None, "ReadTimeout", None, ""), "ReadTimeout"),
        (DeliveryResult(False, None, None, None, ""), "delivery failed"),
        (DeliveryResult(False, None, "x" * 600, None, ""), "x" * 500),
    ],
)
def test_error_text_is_status_or_generic_reason(result: DeliveryResult, stored: str) -> None:
    assert delivery._error_text(result) == stored


def test_disabled_endpoint_holds_callbacks_until_enabled(
    env: Env, receiver: Receiver, sender: WebhookSender
) -> None:
    env.settings = env.settings.replace(callback_disable_after=10.0)
    other = add_account(env, "other")
    url = receiver.url("/flaky")
    receiver.script("/flaky", Reply(500), Reply(500))
    first = add_callback(env, url)
    waiting = add_callback(env, url, next_attempt_at=env.clock.now + timedelta(seconds=60))
    theirs = add_callback(env, url, account_id=other)

    assert env.deliver(sender, first) == {"retry": 1}
    endpoint = env.endpoint(url)
    assert endpoint is not None
    assert (endpoint.failing_since, endpoint.disabled_at) == (env.clock.now, None)

    env.clock.advance(11)  # failing continuously for longer than callback_disable_after
    assert env.deliver(sender, first) == {"held": 1}
    endpoint = env.endpoint(url)
    assert endpoint is not None and endpoint.disabled_at == env.clock.now
    assert env.get(first).state == "held"
    assert env.get(waiting).state == "held"
    assert env.get(theirs).state == "pending"  # another account's endpoint is its own

    # New events for a disabled endpoint are held, not posted.
    fresh = add_callback(env, url)
    assert env.deliver(sender, fresh) == {"held": 1}
    assert len(receiver.requests()) == 2
    with env.factory() as session:
        [listed] = queries.list_endpoints(session=session, account_id=env.account_id)
        assert listed.url == url and listed.disabled_at is not None

    with transaction(env.factory) as session:
        released = queries.enable_endpoint(
            session=session, account_id=env.account_id, url=url, now=env.clock.now
        )
    assert released == 3
    released_ids = [cid for ids in env.published.callback_ids() for cid in ids]
    assert sorted(released_ids) == sorted([first, waiting, fresh])
    assert env.deliver(sender, first, waiting, fresh) == {"delivered": 3}
    endpoint = env.endpoint(url)
    assert endpoint is not None
    assert (endpoint.failing_since, endpoint.disabled_at) == (None, None)


def test_an_endpoint_enabled_while_a_task_holds_its_callbacks_keeps_none_held(
    env: Env, receiver: Receiver, sender: WebhookSender
) -> None:
    """A task reads the endpoint as disabled, then the client enables it (releasing what
    was held then), then the task writes: its callbacks must not be held now, or they
    stay held on an enabled endpoint, never delivered."""
    url = receiver.url("/hook")
    with transaction(env.factory) as session:
        session.add(Endpoint(account_id=env.account_id, url=url, disabled_at=env.clock.now))
    cid = add_callback(env, url)
    engine = env.factory.kw["bind"]
    enabled: list[int] = []

    def enable_after_the_look(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if enabled or not ("FROM callback_endpoints" in statement and "IS NOT NULL" in statement):
            return
        enabled.append(-1)  # once (the enable's own statements pass through here too)
        with transaction(env.factory) as session:
            enabled[0] = queries.enable_endpoint(
                session=session, account_id=env.account_id, url=url, now=env.clock.now
            )

    with listening(engine, ("after_cursor_execute", enable_after_the_look)):
        counts = env.deliver(sender, cid)
    assert enabled == [0]  # enabled between the task's look and its write; nothing held yet
    assert counts == {"deferred": 1}
    # Pending, untried, for the scheduler to publish again (the endpoint takes it now).
    assert_untried(env.get(cid), env.clock.now, delivery.BUSY_DELAY, delivery.BUSY_DELAY)
    env.clock.advance(delivery.BUSY_DELAY)
    assert env.deliver(sender, cid) == {"delivered": 1}


def test_private_address_is_refused_without_a_request(env: Env, receiver: Receiver) -> None:
    cid = add_callback(env, receiver.url("/hook"))
    with WebhookSender() as strict:  # no allow-list: loopback is refused
        outcomes = []
        for _ in range(len(SCHEDULE) + 1):
            outcomes.append(env.deliver(strict, cid))
            env.clock.now = max(env.clock.now, env.get(cid).next_attempt_at)
    assert outcomes == [{"retry": 1}] * len(SCHEDULE) + [{"dead": 1}]
    row = env.get(cid)
    assert row.state == "dead" and row.last_status is None
    assert row.last_error is not None and row.last_error.startswith("unsafe URL")
    assert receiver.requests() == []


# --- isolation: limits, breaker, slow endpoints ----------------------------------------


class Blackhole:
    """A TCP endpoint that accepts connections and never answers."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)  # the kernel completes handshakes; nobody reads
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hook"

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    hole = Blackhole()
    try:
        yield hole
    finally:
        hole.close()


def assert_untried(row: Callback, start: datetime, at_least: float, at_most: float) -> None:
    """Deferred: pending, unattempted, due again between the bounds, for the scheduler."""
    assert (row.state, row.attempts, row.enqueued_at) == ("pending", 0, None)
    waited = (row.next_attempt_at - start).total_seconds()
    assert at_least <= waited <= at_most


def test_an_endpoint_at_its_limit_defers_durably_without_posting(
    env: Env, receiver: Receiver, sender: WebhookSender
) -> None:
    url = receiver.url("/hook")
    key = endpoint_key(env.account_id, url)
    taken = env.gate.acquire(key, env.settings.callback_endpoint_concurrency)
    acquired = time.monotonic()
    assert len(taken.tokens) == env.settings.callback_endpoint_concurrency
    cid = add_callback(env, url)

    assert env.deliver(sender, cid) == {"deferred": 1}
    # Deferred by about as long as the slots have been held (a loaded machine may take
    # more than BUSY_DELAY between the acquire above and the task), with jitter.
    held = max(delivery.BUSY_DELAY, time.monotonic() - acquired)
    assert_untried(env.get(cid), env.clock.now, delivery.BUSY_DELAY, 1.5 * held)
    assert receiver.requests() == []

    for token in taken.tokens:
        env.gate.release(key, token)
    env.clock.now = env.get(cid).next_attempt_at
    assert env.deliver(sender, cid) == {"delivered": 1}


def test_an_open_breaker_keeps_callbacks_until_its_probe_gets_an_answer(
    env: Env, receiver: Receiver, sender: WebhookSender
) -> None:
    url = receiver.url("/hook")
    key = endpoint_key(env.account_id, url)
    for _ in range(env.settings.callback_breaker_failures):
        env.gate.report(key, ok=False, probe=False)  # as many unanswered attempts
    ids = [add_callback(env, url) for _ in range(3)]

    assert env.deliver(sender, *ids) == {"deferred": 3}
    cooldown = env.settings.callback_breaker_cooldown
    for cid in ids:
        assert_untried(env.get(cid), env.clock.now, cooldown - 1, cooldown)
    assert receiver.requests() == []


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[redis.Redis, subprocess.Popen[bytes]]]:
    """A redis-server of the test's own, which it may stop, and a client that does not retry."""
    port = free_port()
    data = tmp_path / "own-redis"
    data.mkdir()
    server = subprocess.Popen(
        redis_server_command(port=port, data_dir=data, persist=False), stdout=subprocess.DEVNULL
    )
    client = redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))
    try:
        wait_for_redis(client)
        yield client, server
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=20)


def test_a_redis_failure_in_the_breakers_bookkeeping_loses_no_outcome(
    env: Env,
    receiver: Receiver,
    sender: WebhookSender,
    own_redis: tuple[redis.Redis, subprocess.Popen[bytes]],
) -> None:
    """An endpoint with a failure on record has its next answer reported to the breaker
    (to reset the count). Redis stops while the lane's POSTs are in flight: the
    answers are still recorded (the breaker is best effort), not dropped with the
    lane, which left them 'delivering' until the lease and POSTed them again."""
    client, server = own_redis
    gate = delivery.gate_for(redis_client=client, settings=env.settings)
    url = receiver.url("/slow")
    gate.report(endpoint_key(env.account_id, url), ok=False, probe=False)
    ids = [add_callback(env, url) for _ in range(3)]

    def stop_redis_once_posted() -> None:
        if receiver.arrived.wait(timeout=WAIT):
            server.terminate()
            server.wait(timeout=WAIT)
        receiver.release.set()

    stopper = threading.Thread(target=stop_redis_once_posted)
    stopper.start()
    try:
        counts = env.deliver(sender, *ids, gate=gate)
    finally:
        stopper.join(timeout=2 * WAIT)
    assert server.returncode is not None  # Redis was gone when the answers came
    assert counts == {"delivered": 3}
    assert [(env.get(cid).state, env.get(cid).attempts) for cid in ids] == [("delivered", 1)] * 3
    assert len(receiver.requests("/slow")) == 3


def test_endpoints_held_for_the_same_time_all_have_their_callbacks_deferred(
    env: Env, receiver: Receiver, sender: WebhookSender, redis_url: str
) -> None:
    """Two endpoints whose breakers let a probe through that has not answered yet: both
    are held for the same recheck time. Every one of their callbacks is deferred to it,
    not only the last endpoint's (the others would wait, published but untouched, for
    the lost-publish sweep)."""
    client = redis.Redis.from_url(redis_url)
    gate = delivery.gate_for(
        redis_client=client, settings=env.settings.replace(callback_breaker_cooldown=0.1)
    )
    # Two origins (an endpoint is an account's origin): never POSTed to here.
    urls = [receiver.url("/a"), receiver.url("/b").replace("127.0.0.1", "localhost")]
    keys = [endpoint_key(env.account_id, url) for url in urls]
    for key in keys:
        for _ in range(env.settings.callback_breaker_failures):
            gate.report(key, ok=False, probe=False)
    wait_for(lambda: all(gate.held_for(key)[0] == 0 for key in keys), timeout=WAIT)
    for key in keys:
        assert gate.acquire(key, 1).probe  # its probe is out, no answer yet
    ids = [add_callback(env, url) for url in urls for _ in range(2)]
    assert env.deliver(sender, *ids, gate=gate) == {"deferred": 4}
    for cid in ids:
        assert_untried(env.get(cid), env.clock.now, 1, 10)
    assert receiver.requests() == []
    client.close()


def test_a_blackholed_endpoint_does_not_hold_the_task_or_other_endpoints(
    env: Env, receiver: Receiver, blackhole: Blackhole
) -> None:
    settings = env.settings.replace(callback_task_wait=0.5)
    stuck = [add_callback(env, blackhole.url) for _ in range(2 * delivery.LANES_PER_TASK)]
    other = add_callback(env, receiver.url("/hook"))
    # Each blackholed POST gives up after `read` seconds: the task must be back before.
    read = 2.0
    with WebhookSender(allow=("127.0.0.1",), connect_timeout=1.0, read_timeout=read) as sender:
        started = time.monotonic()
        counts = delivery.deliver(
            factory=env.factory,
            settings=settings,
            sender=sender,
            gate=env.gate,
            callback_ids=[*stuck, other],
            clock=env.clock,
        )
        took = time.monotonic() - started
        # The task came back after its short wait, not after the blackhole's timeouts.
        assert took < read
        counts = {k: v for k, v in counts.items() if v}
        # The other endpoint's POST was made meanwhile; on a slow machine it may finish
        # after the task's wait, and then its lane records it (in flight, then delivered).
        assert counts in (
            {"delivered": 1, "in_flight": len(stuck)},
            {"in_flight": len(stuck) + 1},
        )
        wait_for(lambda: env.get(other).state == "delivered", timeout=WAIT)

        # The blackholed lanes record their own outcomes once their POSTs time out:
        # one attempt per lane, the rest of each lane put back untried.
        def settled() -> list[Callback] | None:
            rows = [env.get(cid) for cid in stuck]
            return rows if all(r.state == "pending" for r in rows) else None

        rows = wait_for(settled, timeout=read + WAIT)
    tried = [r for r in rows if r.attempts == 1]
    assert len(tried) == delivery.LANES_PER_TASK
    assert all(r.last_error == "ReadTimeout" for r in tried)
    assert all(r.attempts == 0 and r.last_error is None for r in rows if r not in tried)
    assert [s.path for s in receiver.requests()] == ["/hook"]


def test_a_task_past_its_wait_finishes_a_moving_round_and_republishes_the_rest(
    env: Env, receiver: Receiver, sender: WebhookSender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A healthy endpoint with more work than one wait: the round under way is finished
    and recorded by the task, the rest goes back to the queue at once (not to the
    scheduler's next sweep)."""
    monkeypatch.setattr(delivery, "ROUND", 2)
    settings = env.settings.replace(callback_task_wait=0.001)  # spent before the first POST
    ids = [add_callback(env, receiver.url("/hook")) for _ in range(5)]
    counts = delivery.deliver(
        factory=env.factory,
        settings=settings,
        sender=sender,
        gate=env.gate,
        callback_ids=ids,
        clock=env.clock,
    )
    assert {k: v for k, v in counts.items() if v} == {"delivered": 2, "republished": 3}
    assert [env.get(cid).state for cid in ids] == ["delivered"] * 2 + ["pending"] * 3
    assert all(env.get(cid).enqueued_at == env.clock.now for cid in ids[2:])
    assert env.published.callback_ids() == [ids[2:4], ids[4:]]  # ROUND per task
    assert len(receiver.requests("/hook")) == 2


# --- dead letters and tenants ----------------------------------------------------------


def test_list_and_retry_are_tenant_isolated(env: Env) -> None:
    other = add_account(env, "other")
    url = "https://example.com/hook"
    mine_dead = add_callback(env, url, state="dead")
    mine_done = add_callback(env, url, state="delivered")
    mine_pending = add_callback(env, url)
    theirs_dead = add_callback(env, url, account_id=other, state="dead")

    with transaction(env.factory) as session:
        rows, total = queries.list_callbacks(
            session=session, account_id=env.account_id, page=1, page_size=2
        )
        assert total == 3 and len(rows) == 2
        rest, _ = queries.list_callbacks(
            session=session, account_id=env.account_id, page=2, page_size=2
        )
        assert {r.id for r in rows + rest} == {mine_dead, mine_done, mine_pending}
        dead, total = queries.list_callbacks(
            session=session, account_id=env.account_id, state="dead", page=1, page_size=10
        )
        assert [r.id for r in dead] == [mine_dead] and total == 1
        with pytest.raises(ValidationError):
            queries.list_callbacks(
                session=session, account_id=env.account_id, state="lost", page=1, page_size=10
            )

        def retry(callback_id: str) -> Callback:
            return queries.retry_callback(
                session=session,
                account_id=env.account_id,
                callback_id=callback_id,
                now=env.clock.now,
            )

        with pytest.raises(NotFound):
            retry(theirs_dead)
        with pytest.raises(NotFound):
            retry(new_id())
        with pytest.raises(Conflict):
            retry(mine_done)
        with pytest.raises(Conflict):
            retry(mine_pending)
        assert retry(mine_dead).state == "pending"
    assert env.get(theirs_dead).state == "dead"
    assert env.published.callback_ids() == [[mine_dead]]


# --- the scheduler's sweep -------------------------------------------------------------


def test_promote_due_publishes_due_and_lost_not_far_future(env: Env) -> None:
    now = env.clock.now = env.clock.now.replace(microsecond=250_000)
    url = "https://example.com/hook"
    due = [
        add_callback(env, url, enqueued_at=None, next_attempt_at=now - timedelta(seconds=s))
        for s in (3, 2, 1)
    ]
    soon = add_callback(env, url, enqueued_at=None, next_attempt_at=now + timedelta(seconds=100))
    far = add_callback(env, url, enqueued_at=None, next_attempt_at=now + timedelta(seconds=400))
    in_flight = add_callback(env, url, enqueued_at=now - timedelta(seconds=10))
    lost = add_callback(env, url, enqueued_at=now - timedelta(seconds=700))
    add_callback(env, url, enqueued_at=None, state="held")
    add_callback(env, url, enqueued_at=None, state="dead")

    with transaction(env.factory) as session:
        count = scheduling.promote_due(session=session, settings=env.settings, now=now)
    assert count == 5

    immediate = [m for m in env.published.messages if m.eta is None]
    # Due ones (and the lost one) in groups of callback_batch_size, oldest first.
    assert [m.kwargs["callback_ids"] for m in immediate] == [due[:2], [due[2], lost]]
    [timed] = [m for m in env.published.messages if m.eta is not None]
    assert timed.kwargs["callback_ids"] == [soon]
    assert timed.eta == (now + timedelta(seconds=101)).replace(microsecond=0)
    for cid in [*due, soon, lost]:
        assert env.get(cid).enqueued_at == now
    assert env.get(far).enqueued_at is None
    assert env.get(in_flight).enqueued_at == now - timedelta(seconds=10)

    with transaction(env.factory) as session:
        assert scheduling.promote_due(session=session, settings=env.settings, now=now) == 0
    assert len(env.published.messages) == 3


def test_promote_due_reclaims_claims_past_the_lease(env: Env) -> None:
    now = env.clock.now
    lease = scheduling.delivery_lease(env.settings)
    url = "https://example.com/hook"
    orphan = add_callback(
        env, url, state="delivering", attempts=1, next_attempt_at=now - lease - timedelta(seconds=1)
    )
    busy = add_callback(
        env, url, state="delivering", attempts=1, next_attempt_at=now - timedelta(seconds=10)
    )
    spent = add_callback(
        env,
        url,
        state="delivering",
        attempts=len(SCHEDULE) + 1,
        next_attempt_at=now - lease - timedelta(seconds=1),
    )

    with transaction(env.factory) as session:
        assert scheduling.promote_due(session=session, settings=env.settings, now=now) == 1
    assert env.published.callback_ids() == [[orphan]]
    row = env.get(orphan)
    assert (row.state, row.attempts, row.enqueued_at) == ("pending", 1, now)
    assert row.last_error is not None and "worker lost" in row.last_error
    assert env.get(busy).state == "delivering"
    assert env.get(spent).state == "dead"


def test_a_callback_whose_publish_was_lost_goes_out_within_a_minute(env: Env) -> None:
    """Written with its status change, published after commit, the publish lost."""
    now = env.clock.now
    cid = add_callback(env, "https://example.com/hook", enqueued_at=now, next_attempt_at=now)
    with transaction(env.factory) as session:
        scheduling.promote_due(session=session, settings=env.settings, now=now)
    assert not any(cid in m.kwargs["callback_ids"] for m in env.published.messages)
    later = now + timedelta(seconds=env.settings.callback_requeue_after + 1)
    with transaction(env.factory) as session:
        scheduling.promote_due(session=session, settings=env.settings, now=later)
    assert any(cid in m.kwargs["callback_ids"] for m in env.published.messages)


def test_while_no_worker_consumes_callbacks_each_is_published_once(env: Env) -> None:
    """Its task is still in the queue: published again every interval while the workers
    are away, the queue would hold a copy of it per interval when they come back."""
    now = env.clock.now
    waiting = add_callback(env, "https://example.com/a", enqueued_at=now, next_attempt_at=now)
    later = now + timedelta(seconds=env.settings.callback_requeue_after + 1)
    fresh = add_callback(env, "https://example.com/b", enqueued_at=None, next_attempt_at=later)
    with transaction(env.factory) as session:
        scheduling.promote_due(session=session, settings=env.settings, now=later, requeue=False)
    assert env.published.callback_ids() == [[fresh]]  # never published: it goes now
    with transaction(env.factory) as session:
        scheduling.promote_due(session=session, settings=env.settings, now=later, requeue=True)
    assert env.published.callback_ids() == [[fresh], [waiting]]


def test_promote_keeps_a_held_endpoints_callbacks_in_the_database(
    env: Env, receiver: Receiver
) -> None:
    held_url, open_url = receiver.url("/held"), "http://127.0.0.2:9/open"
    key = endpoint_key(env.account_id, held_url)
    for _ in range(env.settings.callback_breaker_failures):
        env.gate.report(key, ok=False, probe=False)
    held = add_callback(env, held_url, enqueued_at=None)
    free = add_callback(env, open_url, enqueued_at=None)
    now = env.clock.now
    with transaction(env.factory) as session:
        count = scheduling.promote_due(
            session=session, settings=env.settings, now=now, gate=env.gate
        )
    assert count == 1
    assert env.published.callback_ids() == [[free]]  # only the free endpoint's
    cooldown = env.settings.callback_breaker_cooldown
    assert_untried(env.get(held), now, cooldown - 1, cooldown)


def test_an_endpoint_gets_the_slots_its_pace_needs() -> None:
    pace = delivery._Pace()
    most = delivery.LANES_PER_TASK
    assert pace.lanes("new", 500) == most  # never measured: as many as allowed
    pace.note("fast", seconds=0.1, posts=500)  # 0.2 ms a POST: one lane does a round
    # ... yet a few POSTs stay in flight: the next are written while answers come.
    assert pace.lanes("fast", 500) == delivery.IN_FLIGHT
    assert pace.lanes("fast", 2) == 2
    pace.note("slow", seconds=2.0, posts=20)  # 100 ms a POST
    assert pace.lanes("slow", 500) == most
    assert delivery.ROUND_TIME == 1.0
    assert pace.lanes("slow", 55) == 6  # 5.5 s of POSTs: six in flight end within a second
    pace.note("fast", seconds=50.0, posts=500)  # it slowed to 100 ms: slots come back at once
    assert pace.lanes("fast", 500) == most


# --- a stopping process's lanes (delivery.drain): the POSTs in flight are waited for, a
# bounded time, and recorded; none is started after.


@pytest.fixture
def running(monkeypatch: pytest.MonkeyPatch) -> delivery._Running:
    """A record of running lanes of the test's own: a drain stops new POSTs for good."""
    fresh = delivery._Running()
    monkeypatch.setattr(delivery, "_running", fresh)
    return fresh


@pytest.fixture
def one_slot(env: Env, redis_url: str) -> Iterator[Env]:
    """``env`` where a task waits a tenth of a second for its lanes, and an endpoint
    takes one POST at a time (its callbacks go out one after the other)."""
    settings = env.settings.replace(callback_task_wait=0.1, callback_endpoint_concurrency=1)
    client = redis.Redis.from_url(redis_url)
    try:
        gate = delivery.gate_for(redis_client=client, settings=settings)
        yield replace(env, settings=settings, gate=gate)
    finally:
        client.close()


def test_a_drain_waits_for_the_post_in_flight_records_it_and_starts_no_other(
    one_slot: Env, receiver: Receiver, sender: WebhookSender, running: delivery._Running
) -> None:
    env = one_slot
    first, second = (add_callback(env, receiver.url("/slow")) for _ in range(2))
    # The receiver holds the first POST: the task stops waiting and leaves both in flight.
    assert env.deliver(sender, first, second) == {"in_flight": 2}
    assert receiver.arrived.is_set()

    drain = threading.Thread(target=delivery.drain, kwargs={"seconds": WAIT})
    drain.start()
    wait_for(running.stopping.is_set, timeout=WAIT)
    receiver.release.set()  # the first gets its answer while the process stops
    drain.join(timeout=2 * WAIT)

    assert not drain.is_alive()
    assert (env.get(first).state, env.get(first).attempts) == ("delivered", 1)
    # Never POSTed: back to pending, unattempted, for the next worker.
    assert (env.get(second).state, env.get(second).attempts) == ("pending", 0)
    assert len(receiver.requests("/slow")) == 1


def test_a_drain_leaves_what_is_unanswered_at_its_bound_to_the_lease(
    one_slot: Env, receiver: Receiver, sender: WebhookSender, running: delivery._Running
) -> None:
    env = one_slot
    held = add_callback(env, receiver.url("/slow"))
    assert env.deliver(sender, held) == {"in_flight": 1}

    started = time.monotonic()
    delivery.drain(seconds=0.2)

    assert time.monotonic() - started < WAIT  # bounded: it did not wait for the answer
    assert (env.get(held).state, env.get(held).attempts) == ("delivering", 1)
    receiver.release.set()
