"""How a batch ends, completed or expired: by what its recipients say, not by who comes first.

The worker that records the last hand-offs ends a batch (``complete_if_done``), and so
does the expiry sweep once ``expire_at`` has passed (``expire_due``). Whichever runs
first, the batch ends ``expired`` exactly when expire_at stopped one of its recipients
before a provider accepted it, else ``completed``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from threading import Thread, current_thread
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.batches.models import Batch, Recipient
from dispatcher.channels.base import Outcome, SendResult
from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.engine import fallback, scheduling, sending
from dispatcher.states import BatchStatus, RecipientStatus
from tests.factories import Tenant
from tests.helpers.races import listening, start_until_blocked
from tests.helpers.receipts import Carrier, claimed_batch, ref_of, statuses

R, B = RecipientStatus, BatchStatus

ACCEPTED = "accepted"
# A transient failure whose retry would fall past expire_at: the worker expires it.
TOO_LATE = "too late to retry"
# Never claimed: still queued for a later group when expire_at passes.
WAITING = "waiting"


def result(kind: str, row: Any) -> SendResult:
    if kind == ACCEPTED:
        return SendResult(Outcome.ACCEPTED, provider_message_id=ref_of(row.id))
    return SendResult(Outcome.TRANSIENT, error_code="busy", retry_after=3600)


@pytest.mark.parametrize("sweep_at", [0, 1, 2], ids=["sweep-first", "sweep-between", "sweep-last"])
@pytest.mark.parametrize(
    ("second", "ends"),
    [(ACCEPTED, B.COMPLETED), (TOO_LATE, B.EXPIRED), (WAITING, B.EXPIRED)],
)
def test_a_batch_past_expire_at_ends_as_its_recipients_say_whoever_comes_first(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
    second: str,
    ends: BatchStatus,
    sweep_at: int,
) -> None:
    """A batch of two whose expire_at passed while a worker handed the first over
    (accepted); the second is handed over too, as ``second``, or still waits its turn.
    The worker records, then (in a later transaction, as after a group that was not the
    last) ends the batch; the sweep comes before, between or after. The batch ended
    completed or expired by that timing."""
    batch_id, rows = claimed_batch(sessions, settings, tenant, count=2)
    claimed_at, providers = rows[0].claimed_at, {"sms": Carrier()}
    handed = rows if second != WAITING else rows[:1]
    with transaction(sessions) as session:
        session.execute(
            update(Batch).where(Batch.id == batch_id).values(expire_at=utcnow() - timedelta(1))
        )
        if second == WAITING:
            session.execute(
                update(Recipient)
                .where(Recipient.id == rows[1].id)
                .values(status=R.QUEUED, claimed_at=None)
            )

    def record() -> None:
        with transaction(sessions) as session:
            batch = session.get_one(Batch, batch_id)
            results = [result(ACCEPTED, rows[0]), result(second, rows[1])]
            outcomes = zip(handed, results, strict=False)
            sending.record_results(
                session, settings, providers, batch, outcomes, utcnow(), claimed_at=claimed_at
            )

    def complete() -> None:
        with transaction(sessions) as session:
            scheduling.complete_if_done(session=session, batch_id=batch_id, now=utcnow())

    def sweep() -> None:
        with transaction(sessions) as session:
            scheduling.expire_due(session=session, now=utcnow())

    steps: list[Callable[[], None]] = [record, complete]
    steps.insert(sweep_at, sweep)
    for step in steps:
        step()
    expected = R.SENT if second == ACCEPTED else R.EXPIRED
    assert statuses(sessions, batch_id) == {0: R.SENT, 1: expected}
    with sessions() as session:
        assert session.get_one(Batch, batch_id).status == ends


@pytest.mark.parametrize("by", ["worker", "sweep"])
def test_a_message_the_carrier_expired_after_accepting_it_does_not_make_its_batch_expired(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
    by: str,
) -> None:
    """A receipt may expire a sent message before or after its batch ended: counted, it
    would make the batch's end depend on when the receipt came."""
    batch_id, rows = claimed_batch(sessions, settings, tenant, count=2)
    claimed_at, providers = rows[0].claimed_at, {"sms": Carrier()}
    with transaction(sessions) as session:
        batch = session.get_one(Batch, batch_id)
        handed = [(rows[0], result(ACCEPTED, rows[0]))]
        sending.record_results(
            session, settings, providers, batch, handed, utcnow(), claimed_at=claimed_at
        )
        session.execute(
            update(Recipient).where(Recipient.id == rows[0].id).values(status=R.EXPIRED)
        )
        session.execute(
            update(Batch).where(Batch.id == batch_id).values(expire_at=utcnow() - timedelta(1))
        )
    with transaction(sessions) as session:
        batch = session.get_one(Batch, batch_id)
        handed = [(rows[1], result(ACCEPTED, rows[1]))]
        sending.record_results(
            session, settings, providers, batch, handed, utcnow(), claimed_at=claimed_at
        )
    with transaction(sessions) as session:
        if by == "worker":
            scheduling.complete_if_done(session=session, batch_id=batch_id, now=utcnow())
        else:
            scheduling.expire_due(session=session, now=utcnow())
    with sessions() as session:
        assert session.get_one(Batch, batch_id).status == B.COMPLETED


def test_a_late_fallback_while_the_batch_ends_reopens_it_rather_than_strand_a_recipient(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
) -> None:
    """PostgreSQL: the worker's last transaction found nothing in flight when a channel's
    webhook moved a sent recipient on to its next channel and committed; the worker then
    wrote its batch completed. The send task published for that recipient finds a completed
    batch and stops: nothing would ever send, end or expire it. The end takes the batch row
    first, as the fallback does: the fallback waits, then re-opens the completed batch."""
    if not settings.database_url.startswith("postgresql"):
        pytest.skip("SQLite: one writer at a time")
    batch_id, rows = claimed_batch(sessions, settings, tenant, count=2)
    claimed_at, providers = rows[0].claimed_at, {"sms": Carrier()}
    with transaction(sessions) as session:
        session.execute(update(Batch).where(Batch.id == batch_id).values(channels=["sms", "rcs"]))
        batch = session.get_one(Batch, batch_id)
        handed = [(row, result(ACCEPTED, row)) for row in rows]
        sending.record_results(
            session, settings, providers, batch, handed, utcnow(), claimed_at=claimed_at
        )
    failure = fallback.Failure(ref_of(rows[0].id), "unreachable", None)

    def fall_back() -> None:
        with transaction(sessions) as session:
            fallback.fall_back(
                session=session,
                where=[Recipient.provider_message_id == failure.provider_message_id],
                failures=[failure],
                now=utcnow(),
            )

    threads: list[Thread] = []

    def meanwhile(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        # Once the end has read that nothing is in flight, in its own transaction.
        if statement.startswith("SELECT EXISTS") and not threads and current_thread() is main:
            threads.append(start_until_blocked(sessions, fall_back, name="fallback"))

    main = current_thread()
    engine = sessions.kw["bind"]
    with listening(engine, ("after_cursor_execute", meanwhile)), transaction(sessions) as session:
        scheduling.complete_if_done(session=session, batch_id=batch_id, now=utcnow())
    [thread] = threads
    thread.join(timeout=30)
    assert statuses(sessions, batch_id) == {0: R.QUEUED, 1: R.SENT}
    with sessions() as session:
        assert session.get_one(Batch, batch_id).status == B.SENDING
