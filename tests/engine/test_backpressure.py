"""Backpressure from callbacks on sending, against a real Redis and both databases.

The last test runs the real thing: a Celery worker process, the API, and a
callbacks queue with deliver tasks that nobody takes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from api.app import create_app
from dispatcher import health, metrics
from dispatcher.batches.models import Recipient
from dispatcher.config import Settings
from dispatcher.db import transaction
from dispatcher.engine import sending
from dispatcher.engine.backpressure import BULK, POLL, CallbackBackpressure
from dispatcher.outbox import Message, TaskName
from dispatcher.runtime import Runtime
from dispatcher.states import BatchStatus, RecipientStatus
from tests.engine import system
from tests.factories import Tenant, make_account, make_batch
from tests.helpers import RecordingPublisher, make_settings, post_batch, wait_for
from workers.celery_app import create_celery

QUEUE = "callbacks"


class Clock:
    """A monotonic clock that moves only when something sleeps on it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []
        self.on_sleep: Callable[[int], object] = lambda n: None

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept.append(seconds)
        self.on_sleep(len(self.slept))


def _clear(c: redis.Redis) -> None:
    c.delete(*metrics.queue_lists(QUEUE), health.consumed_key(QUEUE))
    for key in c.scan_iter(match=f"{health.PREFIX}{QUEUE}:*"):
        c.delete(key)


@pytest.fixture()
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    _clear(c)
    yield c
    _clear(c)
    c.close()


def waiting(client: redis.Redis, n: int, key: str = QUEUE) -> None:
    """``n`` deliver tasks waiting in the callbacks queue (kombu's list)."""
    client.rpush(key, *[b"{}"] * n)


def consumer(client: redis.Redis) -> None:
    """A live callback worker, as its heartbeat says."""
    health.beat(client=client, queues=[QUEUE], hostname="callbacks@test", ttl=30)


def pressure(client: redis.Redis, clock: Clock, limit: int = 2) -> CallbackBackpressure:
    return CallbackBackpressure(client, limit=limit, monotonic=clock.monotonic, sleep=clock.sleep)


class TestWait:
    def test_a_short_queue_does_not_wait(self, client: redis.Redis) -> None:
        clock = Clock()
        consumer(client)
        waiting(client, 1)
        assert pressure(client, clock).wait(1.5) is False
        assert clock.slept == []

    def test_a_long_queue_waits_the_whole_time_and_says_so(self, client: redis.Redis) -> None:
        clock = Clock()
        consumer(client)
        waiting(client, 2)
        assert pressure(client, clock).wait(1.5) is True
        assert sum(clock.slept) == pytest.approx(1.5)
        assert max(clock.slept) <= POLL

    def test_tasks_at_every_priority_level_count(self, client: redis.Redis) -> None:
        clock = Clock()
        consumer(client)
        waiting(client, 1)
        waiting(client, 1, key=f"{QUEUE}\x06\x163")
        assert pressure(client, clock).wait(0.2) is True

    def test_it_stops_waiting_once_callbacks_catch_up(self, client: redis.Redis) -> None:
        clock = Clock()
        consumer(client)
        waiting(client, 3)
        # A callback worker takes a task at each of the first two looks.
        clock.on_sleep = lambda n: client.lpop(QUEUE) if n <= 2 else None
        assert pressure(client, clock).wait(1.5) is False
        assert len(clock.slept) == 2

    def test_a_queue_nobody_consumes_never_holds_sending(self, client: redis.Redis) -> None:
        clock = Clock()
        waiting(client, 50)
        assert pressure(client, clock).wait(1.5) is False
        assert clock.slept == []
        # A worker that stopped cleanly: its own key is gone, the queue's expires with it.
        consumer(client)
        health.forget(client=client, queues=[QUEUE], hostname="callbacks@test")
        assert 0 < int(client.ttl(health.consumed_key(QUEUE))) <= 30
        assert health.workers_seen(client=client, queues=[QUEUE]) == {QUEUE: 0}

    def test_off_never_looks(self, client: redis.Redis) -> None:
        clock = Clock()
        consumer(client)
        waiting(client, 50)
        off = pressure(client, clock, limit=0)
        assert off.wait(1.5) is False
        assert not off.applies_to(10_000)

    def test_redis_down_is_no_reason_not_to_send(self) -> None:
        clock = Clock()
        down = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
        assert pressure(down, clock).wait(1.5) is False

    def test_small_batches_never_wait(self, client: redis.Redis) -> None:
        on = pressure(client, Clock())
        assert not on.applies_to(BULK - 1)
        assert on.applies_to(BULK)


@pytest.fixture()
def bulk(runtime: Runtime, settings: Settings) -> Callable[..., str]:
    def make(recipients: int = BULK, rate: float | None = None) -> str:
        with transaction(runtime.sessions) as session:
            account = make_account(session, rate_limit=rate)
            batch = make_batch(
                session,
                settings=settings,
                account=account,
                recipients=recipients,
                status=BatchStatus.SENDING,
                recipient_status=RecipientStatus.QUEUED,
            )
            return batch.id

    return make


def send(runtime: Runtime, batch_id: str, clock: Clock, limit: int = 2) -> sending.SendReport:
    return sending.send_recipients(
        factory=runtime.sessions,
        settings=runtime.settings,
        providers=runtime.providers,
        limiter=runtime.limiter,
        batch_id=batch_id,
        seq_range=(0, 10_000),
        backpressure=pressure(runtime.redis, clock, limit=limit),
        monotonic=clock.monotonic,
    )


def statuses(runtime: Runtime, batch_id: str) -> set[str]:
    with runtime.sessions() as session:
        rows = session.scalars(select(Recipient.status).where(Recipient.batch_id == batch_id))
        return {str(s.value) for s in rows}


class TestSending:
    def test_bulk_waits_its_slice_then_goes_to_the_tail_of_the_queue(
        self,
        runtime: Runtime,
        publisher: RecordingPublisher,
        client: redis.Redis,
        bulk: Callable[..., str],
    ) -> None:
        batch_id = bulk()
        consumer(client)
        waiting(client, 2)
        clock = Clock()
        report = send(runtime, batch_id, clock)
        assert report.claimed == 0
        assert report.deferred_for == 0.0
        assert sum(clock.slept) == pytest.approx(runtime.settings.send_time_slice)
        assert statuses(runtime, batch_id) == {"queued"}
        again = [m for m in publisher.messages if isinstance(m, Message)]
        assert [(m.task, m.kwargs, m.eta) for m in again] == [
            (TaskName.SEND_CHUNK, {"batch_id": batch_id, "start": 0, "end": 10_000}, None)
        ]

    def test_bulk_goes_out_once_callbacks_catch_up(
        self, runtime: Runtime, client: redis.Redis, bulk: Callable[..., str]
    ) -> None:
        batch_id = bulk()
        consumer(client)
        waiting(client, 2)
        clock = Clock()
        clock.on_sleep = lambda n: client.delete(QUEUE) if n == 3 else None
        report = send(runtime, batch_id, clock)
        assert report.claimed == BULK
        assert len(clock.slept) == 3
        assert statuses(runtime, batch_id) == {"sent"}

    @pytest.mark.parametrize(
        ("recipients", "rate"), [(BULK - 1, None), (BULK, 1000.0)], ids=["small", "rate-limited"]
    )
    def test_small_and_rate_limited_batches_never_wait(
        self,
        runtime: Runtime,
        client: redis.Redis,
        bulk: Callable[..., str],
        recipients: int,
        rate: float | None,
    ) -> None:
        batch_id = bulk(recipients, rate)
        consumer(client)
        waiting(client, 50)
        clock = Clock()
        report = send(runtime, batch_id, clock)
        assert report.claimed == recipients
        assert clock.slept == []
        assert statuses(runtime, batch_id) == {"sent"}


@pytest.mark.system
def test_a_real_send_worker_holds_bulk_while_callbacks_queue_up(
    sqlite_url: str, redis_url: str, tmp_path: Path
) -> None:
    settings = make_settings(database_url=sqlite_url, redis_url=redis_url, var=tmp_path)
    # Leftovers of an earlier module (ETA tasks of other settings) must not leak in.
    redis.Redis.from_url(redis_url).flushdb()
    live: Runtime = create_celery(settings).runtime
    api = create_app(settings, runtime=live).test_client()
    tenant = Tenant(live.sessions, name="bulk")
    client = redis.Redis.from_url(redis_url)
    try:
        # Callbacks are behind: a live callback worker (its heartbeat), two deliver tasks
        # waiting for it (this test runs none, so they stay).
        health.beat(client=client, queues=[QUEUE], hostname="callbacks@test", ttl=300)
        waiting(client, 2)
        with system.Together() as processes:
            processes.add(system.worker_process(settings, tmp_path, name="bp"))
            processes.add(system.beat_process(settings, tmp_path))
            bulk = post_batch(api, tenant.key, [f"+4477004{i:05d}" for i in range(BULK)])
            small = post_batch(api, tenant.key, ["+447700500001"])
            # The small batch was queued behind the bulk one and went out: the bulk one
            # waited its slice, went to the tail of the queue, and waits again.
            wait_for(lambda: sent(live, small) == 1, timeout=30)
            assert sent(live, bulk) == 0
            # The callback worker caught up, and keeps up: it takes whatever comes, beat's
            # promote_callbacks included (emptied once, those filled the queue again and
            # held the bulk batch for good).
            lists = metrics.queue_lists(QUEUE)

            def caught_up_and_sent() -> bool:
                client.delete(*lists)
                return sent(live, bulk) == BULK

            # A bound, loose: 7 s alone, over 30 s once beside the other real-process files.
            wait_for(caught_up_and_sent, timeout=90)
    finally:
        _clear(client)
        client.close()
        live.dispose()


def sent(live: Runtime, batch_id: str) -> int:
    with live.sessions() as session:
        return len(
            session.scalars(
                select(Recipient.id).where(
                    Recipient.batch_id == batch_id, Recipient.sent_at.is_not(None)
                )
            ).all()
        )
