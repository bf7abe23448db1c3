"""Receipts tests' helpers: claimed batches, a lookup-only carrier, recording, reads."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.accounts.models import Account
from dispatcher.batches.models import Batch, Recipient, StatusEvent
from dispatcher.channels.base import Lookup, OutboundMessage, Outcome, Provider, SendResult
from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.engine import scheduling, sending
from dispatcher.receipts import service as receipts
from dispatcher.receipts.models import PendingReceipt
from dispatcher.states import RecipientStatus
from tests.factories import Tenant, make_batch

R = RecipientStatus


class Carrier(Provider):
    """A named provider that only answers lookups (the engine never sends here)."""

    def __init__(self, name: str = "carrier", found: Lookup = Lookup.ACCEPTED) -> None:
        self.name = name
        self.found = found

    def send(self, message: OutboundMessage) -> SendResult:
        raise AssertionError("these tests hand nothing over")

    def lookup(
        self, message: OutboundMessage, *, claimed_at: datetime | None = None
    ) -> tuple[Lookup, str | None]:
        ref = ref_of(message.recipient_id) if self.found is Lookup.ACCEPTED else None
        return self.found, ref


def ref_of(recipient_id: str) -> str:
    return f"c-{recipient_id}"


def claimed_batch(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
    *,
    count: int = 2,
    dialect: str = "mplus",
    options: dict[str, Any] | None = None,
    claimed_at: datetime | None = None,
) -> tuple[str, list[Any]]:
    """A sending batch whose recipients a worker has claimed, as the claim returns them
    (and when: the claim their record names)."""
    with transaction(sessions) as session:
        account = session.get(Account, tenant.id)
        assert account is not None
        now = utcnow()
        batch_id = make_batch(
            session,
            settings=settings,
            account=account,
            send_at=now,
            sender="Acme",
            body="hi",
            destinations=[f"+4477009003{i:02d}" for i in range(count)],
            callback_url="http://127.0.0.1:9/hooks",
            dialect=dialect,
            options=options or {},
        ).id
    with transaction(sessions) as session:
        scheduling.dispatch_batch(session=session, settings=settings, batch_id=batch_id, now=now)
        rows = session.execute(
            update(Recipient)
            .where(Recipient.batch_id == batch_id)
            .values(status=R.SENDING, claimed_at=claimed_at or now, attempts=1)
            .returning(*sending.CLAIM_COLUMNS, Recipient.claimed_at)
        ).all()
    return batch_id, sorted(rows, key=lambda r: r.to)


def record(
    sessions: sessionmaker[Session],
    settings: Settings,
    batch_id: str,
    rows: list[Any],
    provider: Provider,
) -> None:
    """What the worker records once the carrier's answers are back: accepted, with its ids."""
    with transaction(sessions) as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        results = [SendResult(Outcome.ACCEPTED, provider_message_id=ref_of(r.id)) for r in rows]
        handed = zip(rows, results, strict=True)
        claimed_at = rows[0].claimed_at
        sending.record_results(
            session, settings, {"sms": provider}, batch, handed, utcnow(), claimed_at=claimed_at
        )
        scheduling.complete_if_done(session=session, batch_id=batch_id, now=utcnow())


def accept(
    sessions: sessionmaker[Session],
    provider: str,
    *items: receipts.Receipt,
    now: datetime | None = None,
) -> receipts.Accepted:
    with transaction(sessions) as session:
        return receipts.accept(
            session=session, provider=provider, receipts=list(items), now=now or utcnow()
        )


def _status_by(sessions: sessionmaker[Session], batch_id: str, key: Any) -> dict[Any, R]:
    with sessions() as session:
        return dict(
            session.execute(
                select(key, Recipient.status).where(Recipient.batch_id == batch_id)
            ).all()
        )


def states(sessions: sessionmaker[Session], batch_id: str) -> dict[str, R]:
    """The batch's recipients' statuses by number."""
    return _status_by(sessions, batch_id, Recipient.to)


def statuses(sessions: sessionmaker[Session], batch_id: str) -> dict[int, R]:
    """The batch's recipients' statuses by their place in it (seq)."""
    return _status_by(sessions, batch_id, Recipient.seq)


def event_trail(sessions: sessionmaker[Session], recipient_id: str) -> list[str]:
    with sessions() as session:
        return list(
            session.scalars(
                select(StatusEvent.status)
                .where(StatusEvent.recipient_id == recipient_id)
                .order_by(StatusEvent.id)
            )
        )


def pending(sessions: sessionmaker[Session], ref: str) -> int:
    with sessions() as session:
        return (
            session.scalar(
                select(func.count())
                .select_from(PendingReceipt)
                .where(PendingReceipt.provider_message_id == ref)
            )
            or 0
        )


def stored_while_recorded(
    session: Session, row: Any, *, receipt: str, status: RecipientStatus = R.SENT
) -> None:
    """A ``receipt`` stored and the row's outcome (``status``) recorded side by side,
    each unseen by the other (what PostgreSQL allows two transactions to commit)."""
    session.add(
        PendingReceipt(
            provider="carrier",
            provider_message_id=ref_of(row.id),
            status=receipt,
            received_at=utcnow(),
        )
    )
    session.execute(
        update(Recipient)
        .where(Recipient.id == row.id)
        .values(status=status, provider="carrier", provider_message_id=ref_of(row.id))
    )
