"""No tenant holds the send pool: rate-limited work waits in the database, not in a process.

The first tests drive ``send_recipients`` in this process against real Redis (on
SQLite and PostgreSQL); the last runs the real thing: a worker with 4 send
processes, one account with a long throttled backlog, another whose batch must
not wait behind it.
"""

from __future__ import annotations

import statistics
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from dispatcher import outbox
from dispatcher.batches.models import Batch, Recipient
from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.engine import scheduling, sending
from dispatcher.outbox import TaskName
from dispatcher.ratelimit import RateLimiter
from dispatcher.runtime import Runtime
from dispatcher.states import RecipientStatus
from tests.engine import system
from tests.factories import Tenant, make_account, make_batch
from tests.helpers import RecordingPublisher, make_settings, post_batch, wait_for
from workers.celery_app import create_celery

R = RecipientStatus


def dispatched(
    sessions: sessionmaker[Session], settings: Settings, *, rate: float, count: int
) -> str:
    """A due batch of ``count`` for a new account throttled to ``rate``, fanned out into chunks."""
    with transaction(sessions) as session:
        account = make_account(session, name="throttled", rate_limit=rate)
        batch = make_batch(
            session, settings=settings, account=account, recipients=count, send_at=utcnow()
        )
    with transaction(sessions) as session:
        now = utcnow()
        scheduling.dispatch_batch(session=session, settings=settings, batch_id=batch.id, now=now)
    return batch.id


def run(
    runtime: Runtime,
    batch_id: str,
    seq_range: tuple[int, int],
    *,
    settings: Settings | None = None,
    limiter: RateLimiter | None = None,
) -> sending.SendReport:
    """One send task's work, in this process."""
    return sending.send_recipients(
        factory=runtime.sessions,
        settings=settings or runtime.settings,
        providers=runtime.providers,
        limiter=limiter or runtime.limiter,
        batch_id=batch_id,
        seq_range=seq_range,
    )


def queued_rows(sessions: sessionmaker[Session], batch_id: str) -> list[Recipient]:
    with sessions() as session:
        return list(
            session.scalars(
                select(Recipient)
                .where(Recipient.batch_id == batch_id, Recipient.status == R.QUEUED)
                .order_by(Recipient.seq)
            )
        )


def chunk_messages(publisher: RecordingPublisher) -> list[outbox.Message]:
    return [
        m
        for m in publisher.messages
        if isinstance(m, outbox.Message) and m.task is TaskName.SEND_CHUNK
    ]


def test_a_chunk_far_from_its_turn_waits_in_the_database(
    runtime: Runtime, sessions: sessionmaker[Session], publisher: RecordingPublisher
) -> None:
    settings = runtime.settings
    batch_id = dispatched(sessions, settings, rate=5.0, count=300)
    publisher.messages.clear()
    slept: list[float] = []
    limiter = RateLimiter(runtime.redis, max_wait=settings.rate_max_wait, sleep=slept.append)
    before = utcnow()
    report = run(runtime, batch_id, (200, 300), settings=settings, limiter=limiter)
    # 200 recipients are ahead of it at 5/s: its turn is 40 s off. Nothing was sent,
    # no token booked, no sleep: the rows carry the time and the task comes back then.
    assert report.claimed == 0 and report.deferred == 100 and slept == []
    assert report.deferred_for == pytest.approx(40 - settings.rate_max_wait)
    with sessions() as session:
        account_id = session.get_one(Batch, batch_id).account_id
    assert not runtime.redis.exists(f"dispatcher:rl:account:{account_id}")
    rows = [r for r in queued_rows(sessions, batch_id) if r.seq >= 200]
    assert len(rows) == 100
    eta = {r.next_attempt_at for r in rows}
    assert len(eta) == 1
    (when,) = eta
    assert when is not None and timedelta(seconds=38) < when - before < timedelta(seconds=41)
    assert all(r.enqueued_at is not None and r.enqueued_at >= before for r in rows)
    (message,) = chunk_messages(publisher)
    # The same task (same kwargs, same stable id, so cancel still names it), later.
    assert message.kwargs == {"batch_id": batch_id, "start": 200, "end": 300}
    assert message.eta == when
    assert outbox.task_id_for(message) == outbox.chunk_task_id(batch_id, 200)


def test_a_chunk_beyond_the_horizon_is_left_to_the_sweep(
    runtime: Runtime, sessions: sessionmaker[Session], publisher: RecordingPublisher
) -> None:
    settings = runtime.settings.replace(chunk_size=500)
    batch_id = dispatched(sessions, settings, rate=1.0, count=600)
    publisher.messages.clear()
    report = run(runtime, batch_id, (500, 600), settings=settings)
    # Its turn is past the horizon (60 s here): no ETA task in Redis, the sweep has it.
    assert report.deferred == 100 and chunk_messages(publisher) == []
    rows = [r for r in queued_rows(sessions, batch_id) if r.seq >= 500]
    assert all(r.enqueued_at is None and r.next_attempt_at is not None for r in rows)
    with transaction(sessions) as session:
        scheduling.promote_due(
            session=session, settings=settings, now=utcnow() + timedelta(seconds=500)
        )
    again = [
        m
        for m in publisher.messages
        if isinstance(m, outbox.Message) and m.task is TaskName.SEND_RECIPIENTS
    ]
    mine = {i for m in again if m.kwargs["batch_id"] == batch_id for i in m.kwargs["recipient_ids"]}
    assert {r.id for r in rows} <= mine


def test_a_refused_booking_defers_instead_of_sleeping(
    runtime: Runtime, sessions: sessionmaker[Session], publisher: RecordingPublisher
) -> None:
    settings = runtime.settings
    # One token every 2 s: the first slot is now, the next one is beyond RATE_MAX_WAIT (1 s).
    batch_id = dispatched(sessions, settings, rate=0.5, count=20)
    publisher.messages.clear()
    slept: list[float] = []
    limiter = RateLimiter(runtime.redis, max_wait=settings.rate_max_wait, sleep=slept.append)
    report = run(runtime, batch_id, (0, 20), settings=settings, limiter=limiter)
    assert report.claimed == 1 and report.deferred == 19
    assert slept == []  # nothing was slept for: the second slot was refused, not waited for
    # It comes back when the slot is within reach: 2 s - 1 s, less the time that passed.
    assert report.deferred_for is not None and 0 < report.deferred_for <= 1.0
    (message,) = chunk_messages(publisher)
    assert message.eta is not None
    # FIFO within the batch: the first went, the rest wait in order.
    assert [r.seq for r in queued_rows(sessions, batch_id)] == list(range(1, 20))


def test_a_rate_limited_chunk_gives_its_process_back_after_its_time_slice(
    runtime: Runtime, sessions: sessionmaker[Session], publisher: RecordingPublisher
) -> None:
    settings = runtime.settings.replace(send_time_slice=0.5)
    batch_id = dispatched(sessions, settings, rate=20.0, count=100)
    publisher.messages.clear()
    started = utcnow()
    report = run(runtime, batch_id, (0, 100), settings=settings)
    took = (utcnow() - started).total_seconds()
    # About half a second of sending at 20/s, then the rest goes to the tail of the queue,
    # published with the claim of the last group (so the next task books the next slot).
    assert 0 < report.claimed < 40 and report.deferred_for == 0.0
    # Given back well before the whole chunk's time at its rate (5 s): a loaded machine
    # only stretches the slice's own work.
    assert took < 100 / 20.0, took
    (message,) = chunk_messages(publisher)
    assert message.eta is None and message.kwargs == {"batch_id": batch_id, "start": 0, "end": 100}
    rows = queued_rows(sessions, batch_id)
    assert [r.seq for r in rows] == list(range(report.claimed, 100))
    assert all(r.next_attempt_at is None for r in rows)


def test_an_unlimited_account_is_never_deferred(
    runtime: Runtime, sessions: sessionmaker[Session], publisher: RecordingPublisher
) -> None:
    settings = runtime.settings
    batch_id = dispatched(sessions, settings, rate=0.0, count=150)
    report = run(runtime, batch_id, (100, 150), settings=settings)
    assert report.claimed == 50 and report.deferred == 0


# --- the real thing ---------------------------------------------------------------------

A_RATE = 5.0
A_COUNT = 2000


def sent_times(sessions: sessionmaker[Session], batch_id: str) -> list[datetime]:
    with sessions() as session:
        return list(
            session.scalars(
                select(Recipient.sent_at)
                .where(Recipient.batch_id == batch_id, Recipient.sent_at.is_not(None))
                .order_by(Recipient.sent_at)
            )
        )


@pytest.mark.system
def test_a_throttled_backlog_does_not_hold_the_send_pool(
    sqlite_url: str, redis_url: str, tmp_path: Path
) -> None:
    settings = make_settings(
        database_url=sqlite_url,
        redis_url=redis_url,
        var=tmp_path,
        max_destinations=A_COUNT,
        stall_after=60,
    )
    # Leftovers of an earlier module (ETA tasks of other settings) must not leak in.
    redis.Redis.from_url(redis_url).flushdb()
    live: Runtime = create_celery(settings).runtime
    api = create_app(settings, runtime=live).test_client()
    a = Tenant(live.sessions, name="throttled", rate=A_RATE)
    b = Tenant(live.sessions, name="other")
    try:
        with system.Together() as processes:
            processes.add(system.worker_process(settings, tmp_path, name="fair", concurrency=4))
            processes.add(system.beat_process(settings, tmp_path))
            a_posted = utcnow()
            a_batch = post_batch(api, a.key, [f"+4477003{i:05d}" for i in range(A_COUNT)])
            # A's backlog is being worked on: every send process could now be taken by it.
            wait_for(lambda: len(sent_times(live.sessions, a_batch)) >= 10, timeout=30)
            lags = []
            started = utcnow()
            for i in range(3):
                send_at = utcnow() + timedelta(seconds=1)
                when = send_at.isoformat() + "Z"
                b_batch = post_batch(api, b.key, [f"+44770020{i:04d}"], send_at=when)
                times = wait_for(partial(sent_times, live.sessions, b_batch), timeout=20)
                lags.append((times[0] - send_at).total_seconds())
            a_all = sent_times(live.sessions, a_batch)
            a_sent = [t for t in a_all if t >= started]
            # Stop A's backlog, so that it does not run on into later tests.
            reply = api.delete(f"/batch/{a_batch}", headers=a.auth)
            assert reply.status_code == 200, reply.get_json()
    finally:
        live.dispose()
    # B's batch went out at its time, not after A's 400 s backlog (loosely: bench/fairness.py
    # measures it exactly).
    assert max(lags) < 5.0, lags
    # A kept going meanwhile, and no faster than its limit (bench/fairness.py measures
    # how close to it; a loaded machine loses some slots). Tokens are booked a group at
    # a time from after the POST, each booking a group's time after the one before, and
    # nothing goes before its slot: so A's k-th send is no sooner than that, however late
    # any record was written.
    assert len(a_sent) >= 3, a_sent
    group = sending.group_size(settings=settings, rate=A_RATE)
    early = [
        (k, t)
        for k, t in enumerate(a_all)
        if (t - a_posted).total_seconds() < (k - group + 1) / A_RATE * 0.98
    ]
    assert not early, (early[:3], len(a_all))
    print(f"\nB hand-off lag p50 {statistics.median(lags):.2f}s max {max(lags):.2f}s")
