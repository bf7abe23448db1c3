"""The scheduler's sweeps, one at a time, on SQLite and PostgreSQL.

These are the safety nets of the invariants in docs/invariants.md: a publish lost after
commit, retry timers, the horizon, expiry and the reclaim of dead workers' claims.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from threading import Thread
from typing import Any

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import outbox
from dispatcher.accounts.models import Account
from dispatcher.batches import service
from dispatcher.batches.models import Attempt, Batch, Recipient, StatusEvent
from dispatcher.batches.transitions import claim_recipients
from dispatcher.channels.base import Lookup, OutboundMessage, Outcome, Provider, SendResult
from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.engine import scheduling, sending
from dispatcher.errors import Conflict
from dispatcher.states import BatchStatus, RecipientStatus
from tests.factories import Tenant
from tests.helpers import RecordingPublisher
from tests.helpers.engine import create, end_leftover_claims
from tests.helpers.races import listening, postgres_only, start_until_blocked
from tests.helpers.receipts import statuses

R = RecipientStatus


def published(publisher: RecordingPublisher, task: str) -> list[outbox.Message]:
    return [m for m in publisher.messages if isinstance(m, outbox.Message) and m.task == task]


def test_a_dispatch_lost_after_commit_is_published_again_after_the_grace(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
    publisher: RecordingPublisher,
) -> None:
    batch_id = create(sessions, settings, tenant)
    publisher.messages.clear()  # the broker never got it
    now = utcnow()
    with transaction(sessions) as session:
        scheduling.promote_due(session=session, settings=settings, now=now)
    assert not [
        m for m in published(publisher, "dispatch_batch") if m.kwargs["batch_id"] == batch_id
    ]
    with transaction(sessions) as session:
        scheduling.promote_due(session=session, settings=settings, now=now + timedelta(seconds=61))
    assert [m for m in published(publisher, "dispatch_batch") if m.kwargs["batch_id"] == batch_id]


def test_while_a_queue_has_no_consumer_nothing_is_published_twice(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
    publisher: RecordingPublisher,
) -> None:
    """With no worker on the dispatch or send queue (the task then passes requeue=False),
    a dispatch past its grace and a stalled batch are left alone: their tasks wait in the
    queue, and publishing them again at every stall would pile up copies of each for as
    long as the workers are away. What was never published still goes."""
    waiting = create(sessions, settings, tenant)
    stalled = create(sessions, settings, tenant, count=3)
    start = utcnow()
    with transaction(sessions) as session:
        scheduling.dispatch_batch(session=session, settings=settings, batch_id=stalled, now=start)
        # One recipient back from a failed hand-off: queued again, not published yet.
        session.execute(
            update(Recipient)
            .where(Recipient.batch_id == stalled, Recipient.seq == 0)
            .values(enqueued_at=None)
        )
    publisher.messages.clear()
    later = start + timedelta(seconds=max(61, settings.stall_after, settings.requeue_after) + 1)

    def mine() -> list[tuple[str, str, Any]]:
        return [
            (m.task, m.kwargs["batch_id"], m.kwargs.get("recipient_ids"))
            for m in publisher.messages
            if isinstance(m, outbox.Message) and m.kwargs.get("batch_id") in (waiting, stalled)
        ]

    with transaction(sessions) as session:
        seq0 = session.scalars(
            select(Recipient.id).where(Recipient.batch_id == stalled, Recipient.seq == 0)
        ).one()
    for _ in range(2):  # (a stalled batch is released by one sweep, published by the next)
        with transaction(sessions) as session:
            scheduling.promote_due(session=session, settings=settings, now=later, requeue=False)
    assert mine() == [("send_recipients", stalled, [seq0])]
    publisher.messages.clear()
    for _ in range(2):
        with transaction(sessions) as session:
            scheduling.promote_due(session=session, settings=settings, now=later, requeue=True)
    assert {(task, batch) for task, batch, _ in mine()} == {
        ("dispatch_batch", waiting),
        ("send_recipients", stalled),
    }


def test_only_batches_within_the_horizon_are_promoted(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
    publisher: RecordingPublisher,
) -> None:
    far = utcnow() + timedelta(seconds=settings.schedule_horizon * 3)
    batch_id = create(sessions, settings, tenant, send_at=far)

    def mine() -> list[outbox.Message]:
        return [
            m for m in published(publisher, "dispatch_batch") if m.kwargs["batch_id"] == batch_id
        ]

    assert not mine()
    with transaction(sessions) as session:
        scheduling.promote_due(session=session, settings=settings, now=utcnow())
    assert not mine()
    with transaction(sessions) as session:
        scheduling.promote_due(session=session, settings=settings, now=far - timedelta(seconds=10))
        assert session.get(Batch, batch_id).status == BatchStatus.QUEUED  # type: ignore[union-attr]
    (message,) = mine()
    assert message.kwargs == {"batch_id": batch_id} and message.eta == far


def test_dispatch_fans_out_in_chunks_in_batch_order(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
    publisher: RecordingPublisher,
) -> None:
    batch_id = create(sessions, settings, tenant, count=250)
    with transaction(sessions) as session:
        queued = scheduling.dispatch_batch(
            session=session, settings=settings, batch_id=batch_id, now=utcnow()
        )
    assert queued == 250
    chunks = [m.kwargs for m in published(publisher, "send_chunk")]
    assert chunks == [
        {"batch_id": batch_id, "start": 0, "end": 100},
        {"batch_id": batch_id, "start": 100, "end": 200},
        {"batch_id": batch_id, "start": 200, "end": 250},
    ]
    # A second delivery of the same dispatch changes nothing and publishes nothing.
    publisher.messages.clear()
    with transaction(sessions) as session:
        assert (
            scheduling.dispatch_batch(
                session=session, settings=settings, batch_id=batch_id, now=utcnow()
            )
            == 0
        )
    assert publisher.messages == []


def test_retry_timers_are_promoted_when_due_and_stale_work_is_republished(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
    publisher: RecordingPublisher,
) -> None:
    batch_id = create(sessions, settings, tenant, count=3)
    now = utcnow()
    with transaction(sessions) as session:
        scheduling.dispatch_batch(session=session, settings=settings, batch_id=batch_id, now=now)
        ids = session.scalars(
            select(Recipient.id).where(Recipient.batch_id == batch_id).order_by(Recipient.seq)
        ).all()
        soon, late = now + timedelta(seconds=30), now + timedelta(days=1)
        session.execute(
            update(Recipient)
            .where(Recipient.id == ids[0])
            .values(enqueued_at=None, next_attempt_at=soon)
        )
        session.execute(
            update(Recipient)
            .where(Recipient.id == ids[1])
            .values(enqueued_at=None, next_attempt_at=late)
        )
        stale = now - timedelta(seconds=settings.requeue_after + 1)
        session.execute(update(Recipient).where(Recipient.id == ids[2]).values(enqueued_at=stale))
    publisher.messages.clear()
    with transaction(sessions) as session:
        scheduling.promote_due(session=session, settings=settings, now=now)
    sent = {
        rid: m.eta
        for m in published(publisher, "send_recipients")
        for rid in m.kwargs["recipient_ids"]
    }
    assert sent[ids[0]] == soon
    assert ids[1] not in sent  # beyond the horizon: stays in the database
    assert ids[2] in sent
    # Published once: the next sweep does not publish them again.
    publisher.messages.clear()
    with transaction(sessions) as session:
        scheduling.promote_due(session=session, settings=settings, now=now)
    assert not published(publisher, "send_recipients")


def test_expiry_moves_waiting_recipients_to_expired_with_events(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
) -> None:
    batch_id = create(sessions, settings, tenant, count=2)
    with transaction(sessions) as session:
        session.execute(
            update(Batch)
            .where(Batch.id == batch_id)
            .values(expire_at=utcnow() - timedelta(seconds=1))
        )
    with transaction(sessions) as session:
        scheduling.expire_due(session=session, now=utcnow())
    with sessions() as session:
        assert session.get(Batch, batch_id).status == BatchStatus.EXPIRED  # type: ignore[union-attr]
        states = session.scalars(
            select(Recipient.status).where(Recipient.batch_id == batch_id)
        ).all()
        assert set(states) == {R.EXPIRED}
        events = session.scalars(
            select(StatusEvent.status).where(StatusEvent.batch_id == batch_id)
        ).all()
        assert sorted(events) == ["expired", "expired"]


class Ledger(Provider):
    """A carrier stand-in that only answers lookups."""

    name = "ledger"

    def __init__(self, answers: dict[str, tuple[Lookup, str | None]]) -> None:
        self.answers = answers
        self.claimed_at: list[datetime | None] = []

    def send(self, message: OutboundMessage) -> SendResult:
        raise AssertionError("reclaim must never send")

    def lookup(
        self, message: OutboundMessage, *, claimed_at: datetime | None = None
    ) -> tuple[Lookup, str | None]:
        self.claimed_at.append(claimed_at)
        return self.answers[message.to]


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        ((Lookup.ACCEPTED, "carrier-1"), R.SENT),
        ((Lookup.NOT_FOUND, None), R.QUEUED),
        ((Lookup.UNKNOWN, None), R.UNKNOWN),
    ],
)
def test_reclaim_asks_the_provider_and_never_sends_twice(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
    answer: tuple[Lookup, str | None],
    status: RecipientStatus,
) -> None:
    end_leftover_claims(sessions)
    batch_id = create(sessions, settings, tenant, count=2)
    now = utcnow()
    with transaction(sessions) as session:
        scheduling.dispatch_batch(session=session, settings=settings, batch_id=batch_id, now=now)
        first, _second = session.scalars(
            select(Recipient).where(Recipient.batch_id == batch_id).order_by(Recipient.seq)
        ).all()
        first.status, first.claimed_at = R.SENDING, now - timedelta(seconds=settings.send_lease + 1)
        to = first.to
    provider = Ledger({to: answer})
    with transaction(sessions) as session:
        counts = sending.reclaim_stale(
            session=session, settings=settings, providers={"sms": provider}, now=now
        )
    assert counts == {answer[0].value: 1}
    # When the claim began: a provider whose record can be lost compares it (SMPP).
    assert provider.claimed_at == [now - timedelta(seconds=settings.send_lease + 1)]
    with sessions() as session:
        rows = session.scalars(
            select(Recipient).where(Recipient.batch_id == batch_id).order_by(Recipient.seq)
        ).all()
        assert rows[0].status == status
        if status == R.SENT:
            assert rows[0].provider_message_id == "carrier-1"
        assert rows[1].status == R.QUEUED  # not the reclaim's business


def test_a_stalled_sending_batch_has_its_queued_recipients_republished(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
    publisher: RecordingPublisher,
) -> None:
    """A worker killed between groups leaves nothing in sending, only idle queued rows."""
    batch_id = create(sessions, settings, tenant, count=3)
    start = utcnow()
    with transaction(sessions) as session:
        scheduling.dispatch_batch(session=session, settings=settings, batch_id=batch_id, now=start)

    def republished() -> set[str]:
        return {
            rid
            for m in published(publisher, "send_recipients")
            if m.kwargs["batch_id"] == batch_id
            for rid in m.kwargs["recipient_ids"]
        }

    with transaction(sessions) as session:
        scheduling.promote_due(session=session, settings=settings, now=start)
    assert not republished()  # progress is fresh: the chunk task is trusted
    later = start + timedelta(seconds=settings.stall_after + 1)
    with transaction(sessions) as session:
        scheduling.promote_due(session=session, settings=settings, now=later)
    # Released at the end of the sweep (it holds the batch row only briefly), re-published
    # by the next one.
    assert not republished()
    with transaction(sessions) as session:
        scheduling.promote_due(session=session, settings=settings, now=later)
    assert len(republished()) == 3
    publisher.messages.clear()
    with transaction(sessions) as session:
        scheduling.promote_due(session=session, settings=settings, now=later)
    assert not republished()  # once per stall, not every sweep


def cancel(sessions: sessionmaker[Session], tenant: Tenant, batch_id: str) -> int:
    """Cancel the batch as its account does; how many recipients the cancel counted."""
    with transaction(sessions) as session:
        account = session.get(Account, tenant.id)
        assert account is not None
        _batch, count = service.cancel_batch(session=session, account=account, batch_id=batch_id)
    return count


def assert_cancelled_for_good(
    sessions: sessionmaker[Session],
    settings: Settings,
    publisher: RecordingPublisher,
    batch_id: str,
    now: datetime,
) -> None:
    """Both recipients are cancelled, and no later sweep publishes the batch's sending."""
    assert statuses(sessions, batch_id) == {0: R.CANCELLED, 1: R.CANCELLED}
    publisher.messages.clear()
    with transaction(sessions) as session:
        scheduling.promote_due(session=session, settings=settings, now=now + timedelta(days=4))
    assert not [
        m for m in published(publisher, "send_recipients") if m.kwargs["batch_id"] == batch_id
    ]


@pytest.mark.parametrize(
    "result",
    [
        SendResult(Outcome.TRANSIENT, error_code="busy"),
        SendResult(Outcome.CHANNEL, error_code="unreachable"),
        None,  # never handed over (lease deadline)
    ],
)
def test_a_hand_off_failing_after_cancel_is_not_tried_again(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
    publisher: RecordingPublisher,
    result: SendResult | None,
) -> None:
    """Claimed before the DELETE, failed after it: cancelled, not queued for ever."""
    with transaction(sessions) as session:
        account = session.get(Account, tenant.id)
        assert account is not None
        batch_id = service.create_batch(
            session=session,
            settings=settings,
            account=account,
            new=service.NewBatch(
                sender="A",
                body="hi",
                channels=["rcs", "sms"],
                destinations=["+447700900201", "+447700900202"],
            ),
        ).batch.id
    now = utcnow()
    with transaction(sessions) as session:
        scheduling.dispatch_batch(session=session, settings=settings, batch_id=batch_id, now=now)
        claimed = session.execute(
            update(Recipient)
            .where(Recipient.batch_id == batch_id, Recipient.seq == 0)
            .values(status=R.SENDING, claimed_at=now, attempts=1)
            .returning(*sending.CLAIM_COLUMNS)
        ).all()
    assert cancel(sessions, tenant, batch_id) == 1  # the claimed one was not counted
    with transaction(sessions) as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        handed = zip(claimed, [result], strict=True)
        again = sending.record_results(
            session, settings, {}, batch, handed, utcnow(), claimed_at=now
        )
    assert not again
    assert_cancelled_for_good(sessions, settings, publisher, batch_id, now)


def test_reclaim_never_overwrites_an_outcome_recorded_meanwhile(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
) -> None:
    end_leftover_claims(sessions)
    batch_id = create(sessions, settings, tenant, count=1)
    now = utcnow()
    with transaction(sessions) as session:
        scheduling.dispatch_batch(session=session, settings=settings, batch_id=batch_id, now=now)
        session.execute(
            update(Recipient)
            .where(Recipient.batch_id == batch_id)
            .values(status=R.SENDING, claimed_at=now - timedelta(seconds=settings.send_lease + 1))
        )

    class LateWorker(Provider):
        """Answers 'never received' while the worker's record of the send is committing."""

        def send(self, message: OutboundMessage) -> SendResult:
            raise AssertionError("reclaim must never send")

        def lookup(
            self, message: OutboundMessage, *, claimed_at: datetime | None = None
        ) -> tuple[Lookup, str | None]:
            return Lookup.NOT_FOUND, None

    with transaction(sessions) as session:
        # The worker's record lands first (same transaction here, as on SQLite
        # where writers are serialised): the row is no longer the claim reclaim saw.
        stale = session.scalars(select(Recipient).where(Recipient.batch_id == batch_id)).one()
        seen = stale.claimed_at
        session.execute(
            update(Recipient)
            .where(Recipient.id == stale.id)
            .values(status=R.SENT, provider_message_id="p1", claimed_at=None)
        )
        session.expire_all()
        counts = sending.reclaim_stale(
            session=session, settings=settings, providers={"sms": LateWorker()}, now=now
        )
    assert seen is not None and counts == {}
    with sessions() as session:
        row = session.scalars(select(Recipient).where(Recipient.batch_id == batch_id)).one()
        assert (row.status, row.provider_message_id) == (R.SENT, "p1")


@pytest.mark.parametrize(
    "stale",
    [
        # Refused for now: the carrier's ledger has nothing, so reclaim queued it again.
        SendResult(Outcome.TRANSIENT, error_code="busy"),
        # Accepted, though the carrier's ledger had not shown it when reclaim asked.
        SendResult(Outcome.ACCEPTED),
    ],
    ids=["transient", "accepted"],
)
def test_a_stale_record_never_overwrites_the_outcome_of_a_newer_claim(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
    stale: SendResult,
) -> None:
    """A worker stalled past the lease between its hand-off and its record: reclaim found
    nothing at the carrier and queued the recipients again, another worker claimed and
    sent them. The stalled worker's record must not take the newer claim's rows (a
    transient outcome queued them for a retry: sent twice, and the newer record found
    nothing to move; an accepted one replaced the message ids receipts match on)."""
    end_leftover_claims(sessions)
    batch_id = create(sessions, settings, tenant, count=2)
    now = utcnow()
    lapsed = now - timedelta(seconds=settings.send_lease + 1)
    with transaction(sessions) as session:
        scheduling.dispatch_batch(session=session, settings=settings, batch_id=batch_id, now=now)
        # Tried once before: the group's rows differ in more than their ids.
        session.execute(update(Recipient).where(Recipient.seq == 1).values(attempts=1))
        first = claim(session, batch_id, lapsed)
    with transaction(sessions) as session:
        providers = {"sms": Ledger({row.to: (Lookup.NOT_FOUND, None) for row in first})}
        reclaimed = sending.reclaim_stale(
            session=session, settings=settings, providers=providers, now=now
        )
    assert reclaimed == {"not_found": 2}
    with transaction(sessions) as session:
        second = claim(session, batch_id, now)

    def record(rows: list[Any], claimed_at: datetime, **refs: str) -> None:
        with transaction(sessions) as session:
            batch = session.get_one(Batch, batch_id)
            results = [
                SendResult(Outcome.ACCEPTED, provider_message_id=f"{refs['ref']}-{row.to}")
                if refs
                else stale
                for row in rows
            ]
            handed = zip(rows, results, strict=True)
            sending.record_results(
                session, settings, {}, batch, handed, utcnow(), claimed_at=claimed_at
            )

    if stale.outcome is Outcome.ACCEPTED:
        record(first, lapsed, ref="first")
    else:
        record(first, lapsed)
    record(second, now, ref="second")
    with sessions() as session:
        rows = session.scalars(
            select(Recipient).where(Recipient.batch_id == batch_id).order_by(Recipient.seq)
        ).all()
        assert [(r.status, r.provider_message_id) for r in rows] == [
            (R.SENT, f"second-{r.to}") for r in rows
        ]
        # Nothing of the stale outcome either (its retry time, its count of attempts).
        assert [(r.attempts, r.next_attempt_at) for r in rows] == [(2, None), (3, None)]
        tried = session.scalars(
            select(Attempt.outcome).where(Attempt.recipient_id == rows[0].id)
        ).all()
    # Both hand-offs are in the recipient's history, whatever its row says.
    assert sorted(tried) == sorted(["reclaim:not_found", stale.outcome.value, "accepted"])


def test_a_stale_record_while_reclaim_asks_the_carrier_does_not_deadlock(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
) -> None:
    """PostgreSQL: reclaim holds a lapsed claim's row while it asks the carrier; the
    stalled worker's record comes to life meanwhile, takes the batch row (as every writer
    does first) and waits for that row. Reclaim then waited for the batch row to end the
    batch: a deadlock. Reclaim does not wait for a batch row someone holds: it leaves the
    row to the next run, and the worker's own record settles it."""
    postgres_only(settings)
    end_leftover_claims(sessions)
    batch_id = create(sessions, settings, tenant, count=1)
    now = utcnow()
    lapsed = now - timedelta(seconds=settings.send_lease + 1)
    with transaction(sessions) as session:
        scheduling.dispatch_batch(session=session, settings=settings, batch_id=batch_id, now=now)
        [row] = claim(session, batch_id, lapsed)
    accepted = SendResult(Outcome.ACCEPTED, provider_message_id="late")
    threads: list[Thread] = []
    errors: list[BaseException] = []
    deadlocks: list[BaseException] = []

    def late_record() -> None:
        try:
            with transaction(sessions) as session:
                batch = session.get_one(Batch, batch_id)
                handed = [(row, accepted)]
                sending.record_results(
                    session, settings, {}, batch, handed, utcnow(), claimed_at=lapsed
                )
        except BaseException as exc:
            errors.append(exc)

    class Carrier(Ledger):
        """Answers once the worker's late record waits for the row reclaim holds."""

        def lookup(
            self, message: OutboundMessage, *, claimed_at: datetime | None = None
        ) -> tuple[Lookup, str | None]:
            threads.append(start_until_blocked(sessions, late_record, name="late record"))
            return super().lookup(message, claimed_at=claimed_at)

    def failed(context: Any) -> None:
        if getattr(context.original_exception, "sqlstate", None) == "40P01":
            deadlocks.append(context.original_exception)

    engine = sessions.kw["bind"]
    with listening(engine, ("handle_error", failed)):
        with transaction(sessions) as session:
            carrier = Carrier({row.to: (Lookup.ACCEPTED, "late")})
            sending.reclaim_stale(
                session=session, settings=settings, providers={"sms": carrier}, now=now
            )
        [thread] = threads
        thread.join(timeout=30)
    assert (deadlocks, errors) == ([], [])
    with sessions() as session:
        settled = session.get_one(Recipient, row.id)
        assert (settled.status, settled.provider_message_id) == (R.SENT, "late")


def claim(session: Session, batch_id: str, at: datetime) -> list[Any]:
    """Claim the batch's queued recipients as a worker does, at ``at``: the rows it returns."""
    return claim_recipients(
        session=session,
        where=[Recipient.batch_id == batch_id],
        values={"claimed_at": at, "attempts": Recipient.attempts + 1},
        at=at,
        returning=sending.CLAIM_COLUMNS,
    )


def test_a_claim_reclaimed_after_its_batch_was_cancelled_ends_cancelled(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
    publisher: RecordingPublisher,
) -> None:
    """A worker died holding a claim, then the batch was cancelled (the claim not counted).
    The provider never got the message: reclaim must not leave it queued in a cancelled
    batch, where nothing would ever send, cancel or expire it."""
    end_leftover_claims(sessions)
    batch_id = create(sessions, settings, tenant, count=2)
    now = utcnow()
    with transaction(sessions) as session:
        scheduling.dispatch_batch(session=session, settings=settings, batch_id=batch_id, now=now)
        first = session.scalars(
            select(Recipient).where(Recipient.batch_id == batch_id, Recipient.seq == 0)
        ).one()
        first.status, first.claimed_at = R.SENDING, now - timedelta(seconds=settings.send_lease + 1)
        to = first.to
    assert cancel(sessions, tenant, batch_id) == 1  # the claimed one was not counted
    with transaction(sessions) as session:
        counts = sending.reclaim_stale(
            session=session,
            settings=settings,
            providers={"sms": Ledger({to: (Lookup.NOT_FOUND, None)})},
            now=now,
        )
    assert counts == {"not_found": 1}
    assert_cancelled_for_good(sessions, settings, publisher, batch_id, now)
    with sessions() as session:
        events = session.scalars(
            select(StatusEvent.status).where(StatusEvent.batch_id == batch_id)
        ).all()
    assert sorted(events).count("cancelled") == 2  # reported, as any final status is


def cancel_meanwhile(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    batch_id: str,
    errors: list[BaseException] | None = None,
) -> Thread:
    """Cancel the batch in another transaction (as the API would) and wait until that
    committed or waits for a lock this transaction holds; the thread to join. What the
    cancel raises goes to ``errors`` when given."""

    def cancel() -> None:
        try:
            with transaction(sessions) as session:
                account = session.get_one(Account, tenant.id)
                service.cancel_batch(session=session, account=account, batch_id=batch_id)
        except BaseException as exc:
            if errors is None:
                raise
            errors.append(exc)

    return start_until_blocked(sessions, cancel, name="cancel")


def test_a_batch_cancelled_while_the_sweep_promotes_it_stays_cancelled(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
    publisher: RecordingPublisher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL: the sweep has read a scheduled batch as due; a DELETE commits before
    the sweep writes. The batch must stay cancelled (its status was overwritten with
    queued, an illegal move that ended it 'completed' once dispatched)."""
    postgres_only(settings)
    later = utcnow() + timedelta(seconds=settings.schedule_horizon + 60)
    batch_id = create(sessions, settings, tenant, count=2, send_at=later)
    promote = scheduling.promote_if_due
    threads: list[Thread] = []

    def meanwhile(**kwargs: Any) -> bool:
        if kwargs["batch"].id == batch_id and not threads:
            threads.append(cancel_meanwhile(sessions, tenant, batch_id))
        return promote(**kwargs)

    monkeypatch.setattr(scheduling, "promote_if_due", meanwhile)
    publisher.messages.clear()
    with transaction(sessions) as session:
        scheduling.promote_due(session=session, settings=settings, now=later)
    [thread] = threads
    thread.join(timeout=30)
    with sessions() as session:
        assert session.get_one(Batch, batch_id).status == BatchStatus.CANCELLED
        assert set(
            session.scalars(select(Recipient.status).where(Recipient.batch_id == batch_id))
        ) == {R.CANCELLED}


def test_a_batch_cancelled_while_its_dispatch_follows_a_later_send_at_stays_cancelled(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL: an update moved a queued batch's send_at beyond the horizon; its
    dispatch task reads it and goes back to the database, while a DELETE commits. The
    batch must stay cancelled, not become scheduled again."""
    postgres_only(settings)
    batch_id = create(sessions, settings, tenant, count=2)
    now = utcnow()
    with transaction(sessions) as session:
        session.execute(
            update(Batch).where(Batch.id == batch_id).values(send_at=now + timedelta(days=1))
        )
    follow = scheduling.follow_send_at
    threads: list[Thread] = []

    def meanwhile(**kwargs: Any) -> None:
        threads.append(cancel_meanwhile(sessions, tenant, batch_id))
        follow(**kwargs)

    monkeypatch.setattr(scheduling, "follow_send_at", meanwhile)
    with transaction(sessions) as session:
        scheduling.dispatch_batch(session=session, settings=settings, batch_id=batch_id, now=now)
    [thread] = threads
    thread.join(timeout=30)
    with sessions() as session:
        assert session.get_one(Batch, batch_id).status == BatchStatus.CANCELLED


def test_a_cancel_at_the_moment_of_expiry_does_not_deadlock_with_the_expiry(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL: the expiry moved the waiting recipients (their rows locked) when a
    DELETE came: the cancel took the batch row and waited for those recipients, the
    expiry then waited for the batch row. A deadlock: PostgreSQL failed one of them (the
    DELETE answered 503). The expiry takes the batch row first, as the cancel does: the
    cancel waits, then finds the batch expired (a 409: nothing is left to cancel)."""
    postgres_only(settings)
    batch_id = create(sessions, settings, tenant, count=3)
    now = utcnow()
    with transaction(sessions) as session:
        scheduling.dispatch_batch(session=session, settings=settings, batch_id=batch_id, now=now)
        session.execute(
            update(Batch).where(Batch.id == batch_id).values(expire_at=now - timedelta(1))
        )
    expire = scheduling.expire_recipients
    threads: list[Thread] = []
    errors: list[BaseException] = []
    moved: list[int] = []

    def meanwhile(*, batch: Batch, **kwargs: Any) -> int:
        expired = expire(batch=batch, **kwargs)
        if batch.id == batch_id:  # (the sweep also expires what other tests left due)
            moved.append(expired)
            threads.append(cancel_meanwhile(sessions, tenant, batch_id, errors))
        return expired

    monkeypatch.setattr(scheduling, "expire_recipients", meanwhile)
    with transaction(sessions) as session:
        scheduling.expire_due(session=session, now=utcnow())
    assert moved == [3]
    [thread] = threads
    thread.join(timeout=30)
    assert [type(e) for e in errors] == [Conflict]
    with sessions() as session:
        assert session.get_one(Batch, batch_id).status == BatchStatus.EXPIRED
        assert set(
            session.scalars(select(Recipient.status).where(Recipient.batch_id == batch_id))
        ) == {R.EXPIRED}


def test_a_cancel_while_the_sweep_releases_a_stalled_batch_does_not_deadlock(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
) -> None:
    """PostgreSQL: the sweep hands a stalled batch's queued recipients back (their rows
    locked) when a DELETE comes: the cancel took the batch row and waited for those
    recipients, the sweep then waited for the batch row to note its progress. A
    deadlock. The sweep takes the batch rows first, as the cancel does."""
    postgres_only(settings)
    batch_id = create(sessions, settings, tenant, count=3)
    start = utcnow()
    with transaction(sessions) as session:
        scheduling.dispatch_batch(session=session, settings=settings, batch_id=batch_id, now=start)
    engine = sessions.kw["bind"]
    threads: list[Thread] = []
    errors: list[BaseException] = []

    def first_release(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        # After the first of the release's two writes, in the sweep's transaction.
        released = statement.startswith(("UPDATE recipients SET enqueued_at", "UPDATE batches"))
        if released and not threads and threading.current_thread() is main:
            threads.append(cancel_meanwhile(sessions, tenant, batch_id, errors))

    main = threading.current_thread()
    later = start + timedelta(seconds=settings.stall_after + 1)
    with listening(engine, ("after_cursor_execute", first_release)), transaction(sessions) as s:
        scheduling.promote_due(session=s, settings=settings, now=later)
    [thread] = threads
    thread.join(timeout=30)
    assert errors == []
    with sessions() as session:
        assert session.get_one(Batch, batch_id).status == BatchStatus.CANCELLED
        assert set(
            session.scalars(select(Recipient.status).where(Recipient.batch_id == batch_id))
        ) == {R.CANCELLED}


def test_the_expiry_and_the_release_of_stalled_batches_do_not_deadlock(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
) -> None:
    """PostgreSQL: two sending batches, both stalled (a worker died) and past expire_at,
    their recipients waiting for a retry time. The expiry took them one by one in the
    order its read returned (by an index on the status: equal keys in the table's order),
    the release of stalled batches in one UPDATE in its plan's order (by id): each held
    one the other waited for. Nor may the sweep, holding a batch, wait for the recipients
    the expiry holds. The expiry takes batches in id order; the sweep waits for no row
    another transaction holds (it skips it: the next sweep finds it)."""
    postgres_only(settings)
    start = utcnow()
    pair = [create(sessions, settings, tenant, count=2) for _ in range(2)]
    with transaction(sessions) as session:
        for batch_id in pair:
            scheduling.dispatch_batch(
                session=session, settings=settings, batch_id=batch_id, now=start
            )
        session.execute(
            update(Batch).where(Batch.id.in_(pair)).values(expire_at=start - timedelta(seconds=1))
        )
        session.execute(
            update(Recipient)
            .where(Recipient.batch_id.in_(pair))
            .values(enqueued_at=None, next_attempt_at=start)
        )
    # The two orders disagree: the one first by id is last in the table.
    first, second = sorted(pair)
    for i in range(20):
        if table_order(sessions, pair) == [second, first]:
            break
        with transaction(sessions) as session:
            # A new send_at, indexed: a new row version, with index entries of its own.
            moved = start - timedelta(seconds=i + 1)
            session.execute(update(Batch).where(Batch.id == first).values(send_at=moved))
    assert table_order(sessions, pair) == [second, first]
    engine = sessions.kw["bind"]
    threads: list[Thread] = []
    errors: list[BaseException] = []
    later = start + timedelta(seconds=settings.stall_after + 1)

    def release() -> None:
        try:
            with transaction(sessions) as session:
                scheduling.promote_due(session=session, settings=settings, now=later)
        except BaseException as exc:
            errors.append(exc)

    def planned(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        # As the planner does on a table of production size: by index, not a scan of it.
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("SET LOCAL enable_bitmapscan = off")

    def first_lock(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        # Once the expiry holds its first batch and has expired its waiting recipients, the
        # sweep releases the stalled batches (and re-publishes what waits in them).
        expired = statement.startswith("UPDATE recipients SET status")
        if expired and not threads and threading.current_thread() is main:
            threads.append(start_until_blocked(sessions, release, name="release"))

    main = threading.current_thread()
    hooks = [("before_cursor_execute", planned), ("after_cursor_execute", first_lock)]
    with listening(engine, *hooks), transaction(sessions) as session:
        scheduling.expire_due(session=session, now=later)
    [thread] = threads
    thread.join(timeout=30)
    assert errors == []
    with sessions() as session:
        for batch_id in pair:
            assert session.get_one(Batch, batch_id).status == BatchStatus.EXPIRED


def table_order(sessions: sessionmaker[Session], ids: list[str]) -> list[str]:
    """The batches' rows in the order a scan of the table (or of equal index keys) meets them."""
    with sessions() as session:
        return list(
            session.scalars(
                text("SELECT id FROM batches WHERE id = ANY(:ids) ORDER BY ctid"), {"ids": ids}
            )
        )
