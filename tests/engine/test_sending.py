"""One send call in this process (engine/sending.py), against real Redis, on SQLite and PostgreSQL.

What a worker's chunk task must leave behind: every recipient of its range handed
over or waiting on a durable timer, none left queued with nobody to send it.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.batches.models import Batch, Recipient
from dispatcher.channels.base import OutboundMessage, Outcome, Provider, SendResult
from dispatcher.db import transaction, utcnow
from dispatcher.engine import scheduling, sending
from dispatcher.ratelimit import RateLimiter
from dispatcher.runtime import Runtime
from dispatcher.states import BatchStatus, RecipientStatus
from tests.factories import make_account, make_batch

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


def statuses(sessions: sessionmaker[Session], batch_id: str) -> dict[int, RecipientStatus]:
    with sessions() as session:
        return dict(
            session.execute(
                select(Recipient.seq, Recipient.status).where(Recipient.batch_id == batch_id)
            ).all()
        )


def test_a_fallback_between_rate_limited_groups_is_sent_and_the_chunk_finished(
    runtime: Runtime,
) -> None:
    """rcs refuses one recipient of the first group: it is queued on sms while the next
    (shorter) rcs group is booked. Both must go in the same call; a short group is not
    the last one while a fallback still waits behind it."""
    settings, sessions = runtime.settings, runtime.sessions
    with transaction(sessions) as session:
        # 100/s: groups of 20; 30 recipients make a full group and a short one.
        account = make_account(session, name="fallback", rate_limit=100.0)
        batch = make_batch(
            session,
            settings=settings,
            account=account,
            recipients=30,
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
    rcs, sms = Carrier("rcs", frozenset({refused})), Carrier("sms")
    slept: list[float] = []  # booked slots are not waited for: only their order matters
    limiter = RateLimiter(runtime.redis, max_wait=settings.rate_max_wait, sleep=slept.append)
    sending.send_recipients(
        factory=sessions,
        settings=settings,
        providers={"rcs": rcs, "sms": sms},
        limiter=limiter,
        batch_id=batch.id,
        seq_range=(0, 30),
    )
    assert len(rcs.handed) == 30 and sms.handed == [refused]
    assert set(statuses(sessions, batch.id).values()) == {R.SENT}
    with sessions() as session:
        assert session.get_one(Batch, batch.id).status == BatchStatus.COMPLETED
