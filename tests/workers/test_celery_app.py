"""The Celery app: typed task names and routes, time limits, expiring beats, the fork reset."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery.result import EagerResult
from sqlalchemy import delete
from sqlalchemy.exc import DataError

from dispatcher import health, outbox
from dispatcher.accounts.models import Account
from dispatcher.batches.models import Batch
from dispatcher.channels.base import OutboundMessage, Receipt
from dispatcher.channels.simulator import RECEIPTS, Simulator
from dispatcher.channels.smpp.config import parse
from dispatcher.channels.smpp.connector import receipt_from
from dispatcher.channels.smpp.provider import SmppProvider
from dispatcher.channels.smpp.sink import DatabaseSink
from dispatcher.config import ConfigError, Settings
from dispatcher.db import new_id, utcnow
from dispatcher.outbox import QueueName, TaskName
from dispatcher.receipts.models import PendingReceipt
from dispatcher.runtime import Runtime
from dispatcher.states import BatchStatus
from dispatcher.webhooks.models import Callback
from tests.factories import Tenant, make_batch
from tests.helpers import RecordingPublisher
from workers import tasks
from workers.celery_app import beat_schedule, create_celery

ROOT = Path(__file__).resolve().parents[2]
# A connection the workers' provider only names (nothing connects in these tests).
_SMPP_CONNECTION = {
    "name": "local-0",
    "host": "127.0.0.1",
    "port": 9,
    "system_id": "local",
    "password": "pw",
}


def test_every_task_name_is_a_registered_task_with_a_queue(settings: Settings) -> None:
    app = create_celery(settings)
    app.loader.import_default_modules()
    ours = {name for name in app.tasks if not name.startswith("celery.")}
    assert ours == {name.value for name in TaskName}
    assert set(outbox.QUEUES) == set(TaskName)
    routes = app.conf.task_routes
    assert all(routes[name.value]["queue"] == outbox.queue_for(name) for name in TaskName)


def test_an_unknown_task_name_raises_instead_of_going_to_a_default_queue() -> None:
    with pytest.raises(ValueError):
        outbox.queue_for("dispatch_batchh")
    with pytest.raises(ValueError):
        outbox.Message("send_chunks", {})  # type: ignore[arg-type]
    assert outbox.Message("send_chunk", {}).task is TaskName.SEND_CHUNK  # type: ignore[arg-type]
    assert outbox.queue_for("send_chunk") is QueueName.SEND


def test_every_task_is_bounded_and_every_periodic_task_expires(settings: Settings) -> None:
    app = create_celery(settings.replace(periodic_expires=45.0))
    assert app.conf.task_soft_time_limit == settings.task_soft_time_limit
    assert app.conf.task_time_limit == settings.task_time_limit
    assert app.conf.task_soft_time_limit < app.conf.task_time_limit
    schedule = app.conf.beat_schedule
    assert {entry["task"] for entry in schedule.values()} <= {name.value for name in TaskName}
    for entry in schedule.values():
        assert entry["options"]["expires"] >= max(45.0, entry["schedule"])


def test_receipts_held_in_redis_are_polled_only_where_a_channel_has_them(
    settings: Settings,
) -> None:
    """The simulator's and the SMPP connector's receipts wait in Redis for a worker; the
    vendors' come by webhook. With no channel on the first two, nothing polls each second."""
    polled = "simulator-receipts"
    assert polled in create_celery(settings).conf.beat_schedule  # the simulator's default
    carrier = settings.replace(
        channels=("sms",), provider="http", http_provider_url="http://127.0.0.1:9/"
    )
    assert polled not in beat_schedule(carrier)
    assert polled in beat_schedule(carrier.replace(channel_providers={"sms": "simulator"}))


def test_no_task_can_run_past_the_visibility_timeout() -> None:
    with pytest.raises(ConfigError, match="visibility_timeout"):
        Settings(visibility_timeout=900, schedule_horizon=300, task_time_limit=600)
    with pytest.raises(ConfigError, match="visibility_timeout"):
        Settings(visibility_timeout=700, schedule_horizon=300, task_time_limit=398.5)
    ok = Settings(visibility_timeout=700, schedule_horizon=300, task_time_limit=398)
    assert ok.visibility_timeout > ok.schedule_horizon + ok.send_time_slice + ok.task_time_limit
    with pytest.raises(ConfigError, match="soft"):
        Settings(task_soft_time_limit=300, task_time_limit=300)
    with pytest.raises(ConfigError, match="send_time_slice"):
        Settings(task_soft_time_limit=2, task_time_limit=3)


def test_reset_after_fork_forgets_every_client(settings: Settings) -> None:
    runtime = Runtime(settings, RecordingPublisher())
    engine, client, limiter = runtime.engine, runtime.redis, runtime.limiter
    runtime.reset_after_fork()
    assert runtime.engine is not engine
    assert runtime.redis is not client and runtime.limiter is not limiter
    assert runtime.settings is settings  # plain attributes stay
    runtime.dispose()
    client.close()


def test_the_database_driver_is_imported_before_the_pool_forks() -> None:
    # A fresh interpreter: this one imported psycopg long ago.
    code = (
        "import sys\n"
        "from dispatcher.config import Settings\n"
        "from workers.celery_app import preload_driver\n"
        "assert 'psycopg' not in sys.modules\n"
        "preload_driver(Settings(database_url='postgresql+psycopg://u@127.0.0.1:9/db'))\n"
        "assert 'psycopg' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def published_again_only_with_a_consumer(
    app: Any, task: TaskName, queues: list[QueueName], key: str, value: str
) -> None:
    """Beat's run of ``task`` publishes nothing naming ``value`` (in its argument ``key``)
    while no worker beats for ``queues``, and it once after one does."""
    runtime: Runtime = app.runtime
    publisher = runtime.publisher
    assert isinstance(publisher, RecordingPublisher)
    client, names = runtime.redis, [q.value for q in queues]
    run = app.tasks[task.value]
    client.delete(*(health.consumed_key(name) for name in names))
    try:
        run.apply().get()
        assert published_with(publisher, key, value) == 0
        health.beat(client=client, queues=names, hostname="consumer@test", ttl=30)
        run.apply().get()
        assert published_with(publisher, key, value) == 1
    finally:
        health.forget(client=client, queues=names, hostname="consumer@test")
        client.delete(*(health.consumed_key(name) for name in names))


def published_with(publisher: RecordingPublisher, key: str, value: str) -> int:
    """How many published tasks name ``value`` in their argument ``key`` (or its list)."""
    named = (
        m.kwargs.get(key)
        for m in publisher.messages
        if isinstance(m, outbox.Message) and key in m.kwargs
    )
    return sum(value == v or (isinstance(v, list) and value in v) for v in named)


def test_promote_callbacks_publishes_a_callback_again_only_while_a_worker_takes_them(
    settings: Settings, tenant: Tenant
) -> None:
    """A callback published over CALLBACK_REQUEUE_AFTER ago and still pending: its publish
    may have been lost, so beat's run publishes it again, but not while no callback
    worker beats (its task is still in the queue, where every run would add a copy)."""
    app = create_celery(settings)
    app.loader.import_default_modules()
    runtime: Runtime = app.runtime
    runtime.publisher = RecordingPublisher()
    stamped = utcnow() - timedelta(seconds=settings.callback_requeue_after + 5)
    callback_id = new_id()
    with runtime.sessions.begin() as session:
        session.add(
            Callback(
                id=callback_id,
                account_id=tenant.id,
                event_type="message.sent",
                url="http://127.0.0.1:9/hooks",
                payload={"type": "message.sent"},
                state="pending",
                attempts=0,
                next_attempt_at=stamped,
                enqueued_at=stamped,
                created_at=stamped,
            )
        )
    try:
        published_again_only_with_a_consumer(
            app, TaskName.PROMOTE_CALLBACKS, [QueueName.CALLBACKS], "callback_ids", callback_id
        )
    finally:
        # The database is shared with other tests: leave no callback for their sweeps.
        with runtime.sessions.begin() as session:
            session.execute(delete(Callback).where(Callback.id == callback_id))
        runtime.dispose()


def test_promote_due_publishes_a_lost_dispatch_again_only_while_workers_take_them(
    settings: Settings, tenant: Tenant
) -> None:
    """The same for batches: a dispatch published long ago whose batch never started is
    published again only while both the dispatch and the send queue have a worker."""
    app = create_celery(settings)
    app.loader.import_default_modules()
    runtime: Runtime = app.runtime
    runtime.publisher = publisher = RecordingPublisher()
    long_ago = utcnow() - timedelta(seconds=120)
    with runtime.sessions.begin() as session:
        account = session.get_one(Account, tenant.id)
        batch = make_batch(session, settings=settings, account=account, send_at=utcnow())
        # Due two minutes ago (intake takes a past send time as now), published then.
        batch.send_at = batch.enqueued_at = long_ago
        batch_id = batch.id
    publisher.messages.clear()  # intake's publish: the one that was lost
    try:
        queues = [QueueName.DISPATCH, QueueName.SEND]
        published_again_only_with_a_consumer(
            app, TaskName.PROMOTE_DUE, queues, "batch_id", batch_id
        )
    finally:
        # Ended: no later sweep of the shared database finds it.
        with runtime.sessions.begin() as session:
            session.get_one(Batch, batch_id).status = BatchStatus.CANCELLED
        runtime.dispose()


def test_one_receipts_run_applies_more_than_one_claim_of_due_receipts(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst larger than a claim (2,000) is applied by the run that finds it, claim after
    claim, not left for the next wake-up or beat's run a second later."""
    # A loaded machine may take longer than the run's budget over the first claim.
    monkeypatch.setattr(tasks, "RECEIPTS_BUDGET", 60.0)
    app = create_celery(settings.replace(simulator={"receipt_delay": 0}))
    app.loader.import_default_modules()
    runtime: Runtime = app.runtime
    runtime.publisher = publisher = RecordingPublisher()  # before anything is built on it
    runtime.redis.delete(RECEIPTS)
    # A wake-up an earlier test asked for in the same slot would keep this one quiet.
    for key in runtime.redis.scan_iter("dispatcher:receipts:wake:*"):
        runtime.redis.delete(key)
    carrier = Simulator(redis_client=runtime.redis, rules={"receipt_delay": 0})
    carrier.send_many(
        [
            OutboundMessage(
                recipient_id=f"burst-{i}", channel="sms", to="+447700900001", sender="S", body="b"
            )
            for i in range(2_100)
        ]
    )
    try:
        counts = app.tasks[TaskName.SIMULATOR_RECEIPTS.value].apply().get()
        ran = utcnow()
    finally:
        # The database is shared with other tests: leave no receipt for their sweeps.
        with runtime.sessions.begin() as session:
            session.execute(
                delete(PendingReceipt).where(PendingReceipt.provider_message_id.like("sim-burst-%"))
            )
        runtime.dispose()
    # Nothing matches a recipient here: every receipt is kept until its outcome is recorded.
    assert counts == {"applied": 0, "pending": 2_100, "ignored": 0}, counts
    assert carrier.due_receipts() == []
    # Stored receipts get a second look a second later: their outcomes may have been
    # committing beside them (PostgreSQL), unseen by either transaction.
    (recheck,) = [m for m in publisher.messages if isinstance(m, outbox.Message)]
    assert recheck.task is TaskName.SWEEP_RECEIPTS and recheck.eta is not None
    assert 0.5 < (recheck.eta - ran).total_seconds() < 2


def test_a_carriers_receipt_with_an_overlong_id_does_not_stop_the_receipts_behind_it(
    settings: Settings,
) -> None:
    """An SMSC's text receipt whose id field runs past the column (a field this parser
    does not know, read as part of the id): the run that takes it must not fail, or the
    group goes back ahead of the others and every later run fails on it (PostgreSQL
    refuses the over-long value; SQLite stores it)."""
    text = f"id:{'7' * 90} msgref:{'8' * 40} sub:001 dlvrd:000 stat:UNDELIV err:034".encode()
    overlong = receipt_from(SimpleNamespace(tlvs=[], short_message=text, data_coding=0))
    assert overlong is not None
    result, left = _receipts_run(settings, [overlong], [Receipt("smpp-behind-1", "delivered")])
    counts = result.get()
    # Neither matches a message: both kept (the first one cut to the column), none left.
    assert counts == {"applied": 0, "pending": 2, "ignored": 0}, counts
    assert left == []


@pytest.mark.parametrize("behind", [1, 0], ids=["with-others", "alone"])
def test_a_receipt_the_database_refuses_is_dropped_not_put_back_ahead_of_the_rest(
    settings: Settings, behind: int
) -> None:
    """Whatever makes the database refuse one receipt (here a message id past its column,
    which PostgreSQL refuses and SQLite stores), the others of its claim are applied and
    it alone is dropped; refused with nothing else, it stands and goes back."""
    postgres = settings.database_url.startswith("postgresql")
    behind_it = [Receipt(f"smpp-behind-{i}", "delivered") for i in range(behind)]
    result, left = _receipts_run(settings, [Receipt("9" * 300, "delivered")], behind_it)
    if not postgres:
        assert result.get() == {"applied": 0, "pending": 1 + behind, "ignored": 0}
        assert left == []
    elif behind:
        assert result.get() == {"applied": 0, "pending": 1, "ignored": 0, "refused": 1}
        assert left == []
    else:
        assert isinstance(result.result, DataError)
        assert [r.provider_message_id for r in left] == ["9" * 300]


def _receipts_run(
    settings: Settings, *groups: list[Receipt]
) -> tuple[EagerResult[Any], list[Receipt]]:
    """One receipts run (eagerly) over ``groups`` as the SMPP connector's sink stores them
    (each group pushed on its own); returns its result and what it left in Redis."""
    app = create_celery(settings)
    app.loader.import_default_modules()
    runtime: Runtime = app.runtime
    runtime.publisher = RecordingPublisher()
    for key in runtime.redis.scan_iter("dispatcher:smpp:receipts*"):
        runtime.redis.delete(key)
    config = parse({"carriers": {"local": {"connections": [_SMPP_CONNECTION]}}})
    provider = SmppProvider(redis_client=runtime.redis, config=config)
    runtime.__dict__["providers"] = {"sms": provider}
    sink = DatabaseSink(sessions=runtime.sessions, redis_client=runtime.redis)
    for group in groups:
        sink.receipts(group)
    try:
        result = app.tasks[TaskName.SIMULATOR_RECEIPTS.value].apply()
        return result, provider.due_receipts()
    finally:
        with runtime.sessions.begin() as session:
            session.execute(delete(PendingReceipt).where(PendingReceipt.provider == "smpp"))
        runtime.dispose()
