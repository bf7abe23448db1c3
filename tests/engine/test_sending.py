"""One send call in this process (engine/sending.py), against real Redis, on SQLite and PostgreSQL.

What a worker's chunk task must leave behind: every recipient of its range handed
over or waiting on a durable timer, none left queued with nobody to send it.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from datetime import timedelta
from threading import Thread
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import outbox
from dispatcher.batches.models import Batch, Recipient
from dispatcher.channels.base import OutboundMessage, Outcome, Provider, SendResult
from dispatcher.db import transaction, utcnow
from dispatcher.engine import scheduling, sending
from dispatcher.outbox import TaskName
from dispatcher.ratelimit import Limit, RateLimiter
from dispatcher.runtime import Runtime
from dispatcher.states import BatchStatus, RecipientStatus
from tests.factories import make_account, make_batch
from tests.helpers import RecordingPublisher, wait_for
from tests.helpers.races import blocked
from tests.helpers.receipts import statuses

R = RecipientStatus


class Carrier(Provider):
    """Accepts every hand-off but those to ``refused`` numbers (its channel cannot carry them)."""

    def __init__(self, name: str, refused: frozenset[str] = frozenset()) -> None:
        self.name = name
        self.refused = refused
        self.handed: list[str] = []

    def send(self, message: OutboundMessage) -> SendResult:
        self.handed.append(message.to)
        if message.to in self.refused:
            return SendResult(Outcome.CHANNEL, error_code="unreachable")
        return SendResult(Outcome.ACCEPTED, provider_message_id=f"{self.name}-{message.to}")


def fallback_batch(runtime: Runtime, count: int) -> tuple[str, str, str]:
    """A due batch of ``count`` on rcs then sms, for an account at 100/s (groups of 20),
    fanned out: (batch id, account id, the number rcs refuses: seq 3's)."""
    settings, sessions = runtime.settings, runtime.sessions
    with transaction(sessions) as session:
        account = make_account(session, name="fallback", rate_limit=100.0)
        batch = make_batch(
            session,
            settings=settings,
            account=account,
            recipients=count,
            send_at=utcnow(),
            channels=["rcs", "sms"],
        )
    with transaction(sessions) as session:
        scheduling.dispatch_batch(
            session=session, settings=settings, batch_id=batch.id, now=utcnow()
        )
        refused = session.scalars(
            select(Recipient.to).where(Recipient.batch_id == batch.id, Recipient.seq == 3)
        ).one()
    return batch.id, account.id, refused


def send(
    runtime: Runtime, batch_id: str, providers: Mapping[str, Provider], **work: Any
) -> sending.SendReport:
    """One send task's work; booked slots are not waited for (only their order matters)."""
    settings = runtime.settings
    limiter = RateLimiter(runtime.redis, max_wait=settings.rate_max_wait, sleep=lambda _: None)
    return sending.send_recipients(
        factory=runtime.sessions,
        settings=settings,
        providers=providers,
        limiter=limiter,
        batch_id=batch_id,
        **work,
    )


def test_a_fallback_between_rate_limited_groups_is_sent_and_the_chunk_finished(
    runtime: Runtime,
) -> None:
    """rcs refuses one recipient of the first group: it is queued on sms while the next
    (shorter) rcs group is booked. Both must go in the same call; a short group is not
    the last one while a fallback still waits behind it."""
    batch_id, _account, refused = fallback_batch(runtime, 30)
    rcs, sms = Carrier("rcs", frozenset({refused})), Carrier("sms")
    # A clock that stands still: the time slice never ends, however loaded the machine.
    send(runtime, batch_id, {"rcs": rcs, "sms": sms}, seq_range=(0, 30), monotonic=lambda: 0.0)
    assert len(rcs.handed) == 30 and sms.handed == [refused]
    assert set(statuses(runtime.sessions, batch_id).values()) == {R.SENT}
    with runtime.sessions() as session:
        assert session.get_one(Batch, batch_id).status == BatchStatus.COMPLETED


@pytest.mark.parametrize("by", ["ids", "chunk"])
def test_a_fallback_in_the_group_that_ends_a_time_slice_is_published_again(
    runtime: Runtime, publisher: RecordingPublisher, by: str
) -> None:
    """The time slice ends while the first group waits for its slot: the rest of the
    recipients goes to a new task when the group is claimed, before it is handed over.
    One of the group that rcs refuses is queued on sms after that: a task must carry it,
    or it waits, queued, for the stall sweep (minutes, behind the rest of the batch).
    That task carries it alone: one of the whole chunk would run beside the rest's."""
    batch_id, account_id, refused = fallback_batch(runtime, 30)
    with runtime.sessions() as session:
        ids = list(
            session.scalars(
                select(Recipient.id).where(Recipient.batch_id == batch_id).order_by(Recipient.seq)
            )
        )
    # Another task booked most of a second of the account's rate: this one waits for its
    # slot (booked: within rate_max_wait), however long the machine takes to get there.
    limiter = RateLimiter(runtime.redis, max_wait=runtime.settings.rate_max_wait)
    limiter.reserve([Limit(f"account:{account_id}", 100.0)], 95)
    # The clock moves 5 s once the call has started: its time slice is over at once.
    ticks = itertools.chain([0.0], itertools.repeat(5.0))
    publisher.messages.clear()
    rcs, sms = Carrier("rcs", frozenset({refused})), Carrier("sms")
    work: dict[str, Any] = {"recipient_ids": ids} if by == "ids" else {"seq_range": (0, 30)}
    report = send(
        runtime, batch_id, {"rcs": rcs, "sms": sms}, monotonic=lambda: next(ticks), **work
    )
    assert report.claimed == 20 and report.deferred_for == 0.0  # passed on after one group
    rest, *again = [
        m
        for m in publisher.messages
        if isinstance(m, outbox.Message) and m.kwargs.get("batch_id") == batch_id
    ]
    if by == "ids":  # published with the claim
        assert rest.kwargs["recipient_ids"] == ids[20:]
    else:
        assert rest.task is TaskName.SEND_CHUNK and rest.kwargs["start"] == 0
    kwargs = {"batch_id": batch_id, "recipient_ids": [ids[3]]}
    assert again == [outbox.Message(TaskName.SEND_RECIPIENTS, kwargs)]
    assert statuses(runtime.sessions, batch_id)[3] == R.QUEUED  # on sms, for that task


def test_a_claim_cut_short_by_another_task_is_not_the_end_of_the_work(
    runtime: Runtime,
) -> None:
    """PostgreSQL, no rate limit: a task claims its next group with one UPDATE whose
    subquery picks the rows. Another task (a sweep's re-publish overlapping it) holds
    some of them and commits their claim: the UPDATE skips them and wins fewer than a
    group. That is not the last group: the rest of the task's recipients must go too."""
    settings = runtime.settings.replace(chunk_size=10, default_account_rate=0.0)
    if not settings.database_url.startswith("postgresql"):
        pytest.skip("SQLite runs the claim's subquery and UPDATE as one: nothing cuts in")
    sessions = runtime.sessions
    with transaction(sessions) as session:
        account = make_account(session, name="unthrottled", rate_limit=0.0)
        batch = make_batch(
            session, settings=settings, account=account, recipients=30, send_at=utcnow()
        )
    with transaction(sessions) as session:
        scheduling.dispatch_batch(
            session=session, settings=settings, batch_id=batch.id, now=utcnow()
        )
        ids = list(
            session.scalars(
                select(Recipient.id).where(Recipient.batch_id == batch.id).order_by(Recipient.seq)
            )
        )
    carrier = Carrier("sms")
    task = Thread(
        target=sending.send_recipients,
        kwargs={
            "factory": sessions,
            "settings": settings,
            "providers": {"sms": carrier},
            "limiter": None,
            "batch_id": batch.id,
            "recipient_ids": ids,
        },
    )
    with transaction(sessions) as other:
        # The other task's claim of the first five, not committed yet.
        other.execute(
            update(Recipient)
            .where(Recipient.id.in_(ids[:5]))
            .values(status=R.SENDING, claimed_at=utcnow())
        )
        task.start()
        # Its claim waits for those rows, or passes them over.
        wait_for(lambda: blocked(sessions) or not task.is_alive())
    task.join(timeout=30)
    assert not task.is_alive()
    assert sorted(carrier.handed) == sorted(numbers_of(sessions, ids[5:]))
    states = statuses(sessions, batch.id)
    assert [states[seq] for seq in range(5, 30)] == [R.SENT] * 25
    with transaction(sessions) as session:
        # The other task's claim ends too: left in sending, its rows would be stale
        # within a lease, and a reclaim test later in this database would take them.
        session.execute(
            update(Recipient)
            .where(Recipient.id.in_(ids[:5]))
            .values(status=R.UNKNOWN, claimed_at=None)
        )


def numbers_of(sessions: sessionmaker[Session], ids: list[str]) -> list[str]:
    with sessions() as session:
        return list(session.scalars(select(Recipient.to).where(Recipient.id.in_(ids))))


@pytest.mark.parametrize("by", ["ids", "chunk"])
def test_a_batch_a_send_task_finds_expired_ends_expired(runtime: Runtime, by: str) -> None:
    """The send task, not the scheduler's sweep, is the first to see expire_at pass: the
    batch ends as the sweep would end it, expired (it was reported completed)."""
    batch_id, _account, _refused = fallback_batch(runtime, 5)
    with transaction(runtime.sessions) as session:
        session.execute(
            update(Batch).where(Batch.id == batch_id).values(expire_at=utcnow() - timedelta(1))
        )
        ids = list(session.scalars(select(Recipient.id).where(Recipient.batch_id == batch_id)))
    carrier = Carrier("rcs")
    work: dict[str, Any] = {"recipient_ids": ids[:2]} if by == "ids" else {"seq_range": (0, 5)}
    send(runtime, batch_id, {"rcs": carrier}, **work)
    assert carrier.handed == []
    assert set(statuses(runtime.sessions, batch_id).values()) == {R.EXPIRED}
    with runtime.sessions() as session:
        assert session.get_one(Batch, batch_id).status == BatchStatus.EXPIRED


class Clock:
    """A monotonic clock that moves only when a hand-off takes time."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


class SlowCarrier(Carrier):
    """Each hand-off takes ``cost`` seconds of ``clock`` (an HTTP API a few hundred ms away)."""

    def __init__(self, name: str, clock: Clock, cost: float) -> None:
        super().__init__(name)
        self.clock, self.cost = clock, cost

    def send(self, message: OutboundMessage) -> SendResult:
        self.clock.now += self.cost
        return super().send(message)


@pytest.mark.parametrize("by", ["ids", "chunk"])
def test_a_slow_carrier_never_runs_a_send_task_into_its_soft_time_limit(
    runtime: Runtime, publisher: RecordingPublisher, by: str
) -> None:
    """Hand-offs one at a time to a slow API: a chunk could take longer than the task's
    soft time limit, which, raised inside a hand-off, loses the outcomes of the group in
    hand (after the lease they end unknown, sent or not). Past half the limit no hand-off
    starts; what is left is queued again and goes to a new task with the rest."""
    # Half the soft limit (15 s) comes before half the lease (30 s).
    settings = runtime.settings.replace(task_soft_time_limit=30.0, send_lease=60.0)
    batch_id, _account, _refused = fallback_batch(runtime, 30)
    with runtime.sessions() as session:
        ids = list(
            session.scalars(
                select(Recipient.id).where(Recipient.batch_id == batch_id).order_by(Recipient.seq)
            )
        )
    clock = Clock()
    rcs = SlowCarrier("rcs", clock, cost=1.0)  # 20 hand-offs a group: 20 s; the budget: 15 s
    publisher.messages.clear()
    work: dict[str, Any] = {"recipient_ids": ids} if by == "ids" else {"seq_range": (0, 30)}
    limiter = RateLimiter(runtime.redis, max_wait=settings.rate_max_wait, sleep=lambda _: None)
    report = sending.send_recipients(
        factory=runtime.sessions,
        settings=settings,
        providers={"rcs": rcs},
        limiter=limiter,
        batch_id=batch_id,
        monotonic=clock.monotonic,
        **work,
    )
    # The hand-off that began at 15 s was the last: 16 handed over, 4 never.
    assert report.claimed == 20 and len(rcs.handed) == 16 and report.deferred_for == 0.0
    states = statuses(runtime.sessions, batch_id)
    assert [states[seq] for seq in range(30)] == [R.SENT] * 16 + [R.QUEUED] * 14
    [rest] = [
        m
        for m in publisher.messages
        if isinstance(m, outbox.Message) and m.kwargs.get("batch_id") == batch_id
    ]
    if by == "ids":
        assert rest.kwargs["recipient_ids"] == ids
    else:
        assert (rest.task, rest.kwargs["start"], rest.kwargs["end"]) == (TaskName.SEND_CHUNK, 0, 30)


@pytest.mark.parametrize("rate", [100.0, None])
def test_a_claimed_group_is_handed_over_in_the_order_of_the_batch(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, rate: float | None
) -> None:
    """The claim's UPDATE ... RETURNING gives its rows in whatever order the database met
    them (PostgreSQL: heap or index order; a row updated earlier sits elsewhere), not in
    the order of its subquery. A group handed over in that order broke FIFO within the
    group, and a hand-off cut short at the deadline sent later rows before earlier ones.
    Here the claim's rows come back reversed, on both databases and both paths (booked
    groups, groups chosen inside the claim)."""
    with transaction(runtime.sessions) as session:
        account = make_account(session, name="fifo", rate_limit=rate)
        batch = make_batch(
            session,
            settings=runtime.settings,
            account=account,
            recipients=30,
            send_at=utcnow(),
            channels=["sms"],
        )
    with transaction(runtime.sessions) as session:
        scheduling.dispatch_batch(
            session=session, settings=runtime.settings, batch_id=batch.id, now=utcnow()
        )
        in_order = list(
            session.scalars(
                select(Recipient.to).where(Recipient.batch_id == batch.id).order_by(Recipient.seq)
            )
        )
    claim = sending.claim_recipients

    def reversed_claim(**kwargs: Any) -> list[Any]:
        return claim(**kwargs)[::-1]

    monkeypatch.setattr(sending, "claim_recipients", reversed_claim)
    sms = Carrier("sms")
    send(runtime, batch.id, {"sms": sms}, seq_range=(0, 30), monotonic=lambda: 0.0)
    assert sms.handed == in_order


def test_a_row_that_changed_channel_after_its_group_was_booked_is_not_sent_on_its_tokens(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group's tokens are booked on its channel before the claim. One of its rows is
    meanwhile taken by another task (a duplicate delivery), refused by rcs and queued on
    sms: claimed with the group, it went out on sms on rcs tokens, and sms's own limit
    never counted it. It is left to the task that moved it, which books sms for it."""
    settings = runtime.settings.replace(channel_rates={"sms": 50.0})
    batch_id, _account, _refused = fallback_batch(runtime, 5)
    booked = sending._book_group
    moved: list[str] = []

    def meanwhile(*args: Any) -> Any:
        ahead = booked(*args)
        if ahead is not None and not moved:
            group, *_booking = ahead
            moved.append(group[3])
            with transaction(runtime.sessions) as session:
                session.execute(
                    update(Recipient)
                    .where(Recipient.id == group[3])
                    .values(channel="sms", channel_index=1)
                )
        return ahead

    monkeypatch.setattr(sending, "_book_group", meanwhile)
    rcs, sms = Carrier("rcs"), Carrier("sms")
    limiter = RateLimiter(runtime.redis, max_wait=settings.rate_max_wait, sleep=lambda _: None)
    sending.send_recipients(
        factory=runtime.sessions,
        settings=settings,
        providers={"rcs": rcs, "sms": sms},
        limiter=limiter,
        batch_id=batch_id,
        seq_range=(0, 5),
        monotonic=lambda: 0.0,
    )
    assert len(rcs.handed) == 4 and sms.handed == []
    assert statuses(runtime.sessions, batch_id) == {
        0: R.SENT,
        1: R.SENT,
        2: R.SENT,
        3: R.QUEUED,
        4: R.SENT,
    }
