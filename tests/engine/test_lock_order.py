"""Lock waits and deadlocks that `python -m bench.soak` (a mixed load on PostgreSQL) showed,
each reproduced with two sessions. PostgreSQL only: SQLite runs one writer at a time."""

from __future__ import annotations

import threading
from datetime import timedelta
from threading import Thread
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.batches.models import Recipient
from dispatcher.config import Settings
from dispatcher.db import new_id, transaction, utcnow
from dispatcher.engine import scheduling
from dispatcher.states import CallbackState
from dispatcher.webhooks import scheduling as callback_scheduling
from dispatcher.webhooks.models import Callback
from tests.factories import Tenant
from tests.helpers import RecordingPublisher
from tests.helpers.engine import create
from tests.helpers.races import listening, postgres_only, start_until_blocked


def test_a_record_does_not_wait_for_the_sweep_republishing_recipients(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
    publisher: RecordingPublisher,
) -> None:
    """PostgreSQL: the sweep released a stalled batch (its row locked) and then went on to
    re-publish every waiting recipient, up to 5,000, one UPDATE per batch: 1-5 s on the
    soak's loaded machine. A send worker ending a group of that batch (complete_if_done
    takes the batch row) waited all that time (the soak's lock waits over 1 s). The sweep
    now re-publishes before it takes any batch row."""
    postgres_only(settings)
    batch_id = create(sessions, settings, tenant, count=3)
    start = utcnow()
    with transaction(sessions) as session:
        scheduling.dispatch_batch(session=session, settings=settings, batch_id=batch_id, now=start)
        # Waiting to be re-published (a retry time came), in a batch with no progress since.
        session.execute(
            update(Recipient).where(Recipient.batch_id == batch_id).values(enqueued_at=None)
        )
    engine = sessions.kw["bind"]
    later = start + timedelta(seconds=settings.stall_after + 1)
    waited: list[bool] = []
    threads: list[Thread] = []

    def record() -> None:
        with transaction(sessions) as session:
            scheduling.complete_if_done(session=session, batch_id=batch_id, now=later)

    def republishing(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        # The re-publish (its UPDATE returns the ids it took), in the sweep's transaction.
        republish = statement.startswith("UPDATE recipients SET enqueued_at")
        if republish and "RETURNING" in statement and not threads and _main is _current():
            threads.append(start_until_blocked(sessions, record, name="record"))
            waited.append(threads[0].is_alive())

    _current = threading.current_thread
    _main = _current()
    with listening(engine, ("after_cursor_execute", republishing)), transaction(sessions) as s:
        scheduling.promote_due(session=s, settings=settings, now=later)
    [thread] = threads
    thread.join(timeout=30)
    assert waited == [False]


def test_a_callback_claimed_while_the_sweep_republishes_is_left_to_its_deliverer(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
    publisher: RecordingPublisher,
) -> None:
    """PostgreSQL: the callbacks' sweep read a pending callback as lost (its task long
    published) while a deliver task claimed it; the sweep then stamped it by id alone,
    so it held that row until its own commit (thousands of rows, seconds on the soak's
    loaded machine: the deliver task's record of its POST waited for it), and published
    it a second time. It now takes only rows still pending that nobody holds."""
    postgres_only(settings)
    now = utcnow()
    lost = now - timedelta(seconds=settings.callback_requeue_after + 1)
    callback_id = new_id()
    with transaction(sessions) as session:
        session.add(
            Callback(
                id=callback_id,
                account_id=tenant.id,
                batch_id=new_id(),
                recipient_id=new_id(),
                event_type="message.sent",
                url="http://127.0.0.1:9/callback",
                payload={"type": "message.sent"},
                state=CallbackState.PENDING,
                attempts=0,
                next_attempt_at=lost,
                enqueued_at=lost,
                created_at=lost,
            )
        )
    engine = sessions.kw["bind"]
    waited: list[bool] = []
    threads: list[Thread] = []

    def claim() -> None:
        with transaction(sessions) as session:
            session.execute(
                update(Callback)
                .where(Callback.id == callback_id)
                .values(state=CallbackState.DELIVERING, attempts=1)
            )

    def record() -> None:
        with transaction(sessions) as session:
            session.execute(
                update(Callback)
                .where(Callback.id == callback_id, Callback.state == CallbackState.DELIVERING)
                .values(state=CallbackState.DELIVERED)
            )

    def meanwhile(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if _current() is not _main:
            return
        if statement.startswith("SELECT callbacks.id") and not threads:
            # Read as lost: a deliver task claims it now (and commits).
            threads.append(Thread(target=claim, name="claim"))
            threads[0].start()
            threads[0].join(timeout=30)
        elif statement.startswith("UPDATE callbacks SET enqueued_at") and len(threads) == 1:
            # Stamped by the sweep: the deliver task records its POST.
            threads.append(start_until_blocked(sessions, record, name="record"))
            waited.append(threads[1].is_alive())

    _current = threading.current_thread
    _main = _current()
    publisher.messages.clear()
    with listening(engine, ("after_cursor_execute", meanwhile)), transaction(sessions) as session:
        callback_scheduling.promote_due(session=session, settings=settings, now=now)
    for thread in threads:
        thread.join(timeout=30)
    assert waited == [False]
    assert not [m for m in publisher.messages if callback_id in str(m)]
    with sessions() as session:
        assert session.get_one(Callback, callback_id).state == CallbackState.DELIVERED
