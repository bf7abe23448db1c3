"""The engine end to end: real Redis, real Celery worker and beat processes, SQLite.

Each test drives the public API (or publishes tasks as the system would) and
waits for conditions with deadlines; the simulator's ledger counts every
hand-off, so "sent exactly once" is checked, not assumed.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from dispatcher.batches.models import Attempt, Batch, Recipient
from dispatcher.channels.simulator import Simulator
from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.runtime import Runtime
from dispatcher.states import BatchStatus, RecipientStatus
from tests.engine import system
from tests.factories import Tenant as Account
from tests.helpers import wait_for
from tests.helpers.engine import numbers, send
from tests.helpers.reads import recipients

pytestmark = pytest.mark.system
R = RecipientStatus
DONE = {R.SENT, R.DELIVERED, R.FAILED, R.EXPIRED, R.CANCELLED}


@pytest.fixture(scope="module")
def api(live: Runtime) -> FlaskClient:
    return create_app(live.settings, runtime=live).test_client()


@pytest.fixture(scope="module")
def ledger(live: Runtime) -> Simulator:
    return Simulator(redis_client=live.redis, rules={})


def all_in(sessions: sessionmaker[Session], batch_id: str, states: set[RecipientStatus]) -> bool:
    rows = recipients(sessions, batch_id)
    return bool(rows) and all(r.status in states for r in rows)


def handoffs(ledger: Simulator, rows: list[Recipient]) -> dict[str, int]:
    counts = ledger.handoffs()
    return {r.id: sum(v for k, v in counts.items() if k.startswith(r.id + ":")) for r in rows}


@pytest.fixture(scope="module", autouse=True)
def processes(send_worker: system.Process, scheduler: system.Process) -> Iterator[None]:
    yield


def test_immediate_batch_is_sent_once_and_delivered(
    api: FlaskClient, live_sessions: sessionmaker[Session], ledger: Simulator
) -> None:
    account = Account(live_sessions)
    batch_id = send(api, account, numbers("+44770050", 250))
    wait_for(lambda: all_in(live_sessions, batch_id, {R.DELIVERED}), timeout=30)
    rows = recipients(live_sessions, batch_id)
    assert set(handoffs(ledger, rows).values()) == {1}
    reply = api.get(f"/batch/{batch_id}", headers=account.auth).get_json()
    assert reply["status"] == "completed"
    assert reply["counts"]["delivered"] == 250


def test_scheduled_batch_is_sent_at_its_time_and_not_before(
    api: FlaskClient, live_sessions: sessionmaker[Session]
) -> None:
    account = Account(live_sessions)
    send_at = utcnow() + timedelta(seconds=3)
    batch_id = send(api, account, numbers("+44770051", 3), send_at=send_at.isoformat() + "Z")
    # Before its time nothing is handed over.
    rows = recipients(live_sessions, batch_id)
    assert all(r.status in {R.SCHEDULED, R.QUEUED} for r in rows)
    wait_for(lambda: all_in(live_sessions, batch_id, {R.SENT, R.DELIVERED}), timeout=20)
    for r in recipients(live_sessions, batch_id):
        assert r.sent_at is not None and r.sent_at >= send_at


def _redis_mentions(url: str, needle: str) -> bool:
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key)
            if kind == b"list":
                values = client.lrange(key, 0, -1)
            elif kind == b"hash":
                values = list(client.hvals(key))
            elif kind == b"zset":
                values = client.zrange(key, 0, -1)
            elif kind == b"string":
                values = [client.get(key) or b""]
            else:
                values = []
            if any(needle.encode() in v for v in values):
                return True
        return False
    finally:
        client.close()


def test_batch_beyond_the_horizon_waits_in_the_database_not_in_redis(
    api: FlaskClient, live_sessions: sessionmaker[Session], sys_settings: Settings
) -> None:
    account = Account(live_sessions)
    far = utcnow() + timedelta(days=7)
    batch_id = send(api, account, numbers("+44770052", 2), send_at=far.isoformat() + "Z")
    # Let the scheduler run a few rounds: it must leave the batch alone.
    marker = utcnow()
    wait_for(lambda: utcnow() > marker + timedelta(seconds=2 * sys_settings.scheduler_interval))
    with live_sessions() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None and batch.status == BatchStatus.SCHEDULED
    assert not _redis_mentions(sys_settings.redis_url, batch_id)
    # A week passes (the clock cannot move, the data can): the scheduler promotes it.
    with transaction(live_sessions) as session:
        session.execute(update(Batch).where(Batch.id == batch_id).values(send_at=utcnow()))
    wait_for(lambda: all_in(live_sessions, batch_id, {R.SENT, R.DELIVERED}), timeout=20)


def test_rcs_unreachable_falls_back_to_sms_and_attempts_are_recorded(
    api: FlaskClient, live_sessions: sessionmaker[Session]
) -> None:
    account = Account(live_sessions)
    unreachable, reachable = numbers("+44770090", 2), numbers("+44770053", 2)
    batch_id = send(api, account, unreachable + reachable, channel="rcs", fallback_channels=["sms"])
    wait_for(lambda: all_in(live_sessions, batch_id, {R.SENT, R.DELIVERED}), timeout=20)
    with live_sessions() as session:
        for r in recipients(live_sessions, batch_id):
            tried = session.execute(
                select(Attempt.channel, Attempt.outcome)
                .where(Attempt.recipient_id == r.id)
                .order_by(Attempt.id)
            ).all()
            if r.to in unreachable:
                assert r.channel == "sms"
                assert [tuple(t) for t in tried] == [("rcs", "channel"), ("sms", "accepted")]
            else:
                assert r.channel == "rcs"
                assert [tuple(t) for t in tried] == [("rcs", "accepted")]


def test_every_channel_failing_ends_failed_with_the_last_error(
    api: FlaskClient, live_sessions: sessionmaker[Session]
) -> None:
    account = Account(live_sessions)
    batch_id = send(api, account, numbers("+44770080", 1))  # invalid for every channel
    wait_for(lambda: all_in(live_sessions, batch_id, {R.FAILED}), timeout=20)
    (row,) = recipients(live_sessions, batch_id)
    assert row.error_code == "invalid"


def test_transient_failure_is_retried_later_and_then_succeeds(
    api: FlaskClient, live_sessions: sessionmaker[Session]
) -> None:
    account = Account(live_sessions)
    batch_id = send(api, account, numbers("+44770070", 2))  # busy on the first try
    wait_for(lambda: all_in(live_sessions, batch_id, {R.SENT, R.DELIVERED}), timeout=20)
    with live_sessions() as session:
        for r in recipients(live_sessions, batch_id):
            outcomes = session.scalars(
                select(Attempt.outcome).where(Attempt.recipient_id == r.id).order_by(Attempt.id)
            ).all()
            assert list(outcomes) == ["transient", "accepted"]
            first, second = session.scalars(
                select(Attempt.at).where(Attempt.recipient_id == r.id).order_by(Attempt.id)
            ).all()
            assert second - first >= timedelta(seconds=0.4)  # the durable retry time was kept


def test_a_task_delivered_twice_sends_once(
    api: FlaskClient, live: Runtime, live_sessions: sessionmaker[Session], ledger: Simulator
) -> None:
    account = Account(live_sessions)
    batch_id = send(api, account, numbers("+44770054", 40))
    # Duplicate deliveries of the dispatch and of every chunk, as a broker may do.
    from dispatcher import outbox

    live.publisher.publish(
        [outbox.Message("dispatch_batch", {"batch_id": batch_id})] * 3
        + [outbox.Message("send_chunk", {"batch_id": batch_id, "start": 0, "end": 40})] * 3
    )
    wait_for(lambda: all_in(live_sessions, batch_id, {R.SENT, R.DELIVERED}), timeout=20)
    rows = recipients(live_sessions, batch_id)
    assert set(handoffs(ledger, rows).values()) == {1}


def test_cancel_during_sending_leaves_every_counted_recipient_unsent(
    api: FlaskClient, live_sessions: sessionmaker[Session], ledger: Simulator
) -> None:
    account = Account(live_sessions, rate=40)
    batch_id = send(api, account, numbers("+44770055", 400))
    wait_for(
        lambda: any(
            r.status != R.QUEUED and r.status != R.SCHEDULED
            for r in recipients(live_sessions, batch_id)
        ),
        timeout=20,
    )
    reply = api.delete(f"/batch/{batch_id}", headers=account.auth)
    assert reply.status_code == 200
    cancelled = reply.get_json()["cancelledCount"]
    assert 0 < cancelled < 400
    with live_sessions() as session:
        counted = set(
            session.scalars(
                select(Recipient.id).where(
                    Recipient.batch_id == batch_id, Recipient.status == R.CANCELLED
                )
            )
        )
    assert len(counted) == cancelled
    # Let in-flight work finish, then check that none of the counted went out.
    wait_for(lambda: all_in(live_sessions, batch_id, DONE), timeout=20)
    rows = recipients(live_sessions, batch_id)
    sent = handoffs(ledger, rows)
    assert all(sent[rid] == 0 for rid in counted)
    assert sum(1 for r in rows if r.status == R.CANCELLED) == cancelled
    assert all(sent[r.id] == 1 for r in rows if r.id not in counted)


def test_killed_worker_loses_nothing_and_sends_nothing_twice(
    api: FlaskClient,
    live_sessions: sessionmaker[Session],
    ledger: Simulator,
    sys_settings: Settings,
    logs: Path,
    send_worker: system.Process,
) -> None:
    """kill -9 of a worker (main process and pool) mid-chunk, then a restart."""
    slow = sys_settings.replace(simulator={**sys_settings.simulator, "latency_ms": 15})
    account = Account(live_sessions)
    # Only the doomed worker may take this batch: stop the shared one for good
    # (a stopped-but-alive worker would still pull a task off the broker).
    send_worker.stop()
    with system.worker(slow, logs, name="doomed", concurrency=1) as doomed:
        batch_id = send(api, account, numbers("+44770056", 300))
        wait_for(
            lambda: sum(r.status == R.SENT for r in recipients(live_sessions, batch_id)) > 20,
            timeout=30,
        )
        doomed.kill_group(signal.SIGKILL)
        doomed.proc.wait(timeout=10)
    left = recipients(live_sessions, batch_id)
    assert any(r.status in {R.QUEUED, R.SENDING} for r in left)
    # The restart: a new worker; the scheduler settles the dead worker's claims
    # after the lease and re-publishes what its chunk had not reached.
    with system.worker(sys_settings, logs, name="restarted", concurrency=2):
        wait_for(lambda: all_in(live_sessions, batch_id, {R.SENT, R.DELIVERED}), timeout=60)
    rows = recipients(live_sessions, batch_id)
    assert len(rows) == 300
    assert set(handoffs(ledger, rows).values()) == {1}
