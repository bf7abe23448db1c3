"""Factories: accounts, keys and batches written through the services, in a known state.

``make_batch`` writes the batch with :func:`dispatcher.batches.service.create_batch`
(the intake path), then, when asked for another state, puts the batch and its
recipients there directly: a fixture, not a transition under test.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.accounts import service as accounts
from dispatcher.accounts.models import Account
from dispatcher.batches import service as batches
from dispatcher.batches.models import Batch, Recipient
from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.states import BatchStatus, RecipientStatus


def numbers(count: int, prefix: str = "+44770090") -> list[str]:
    """``count`` distinct possible UK mobile numbers (E.164) starting with ``prefix``."""
    width = 13 - len(prefix)
    return [f"{prefix}{i:0{width}d}" for i in range(count)]


def make_account(
    session: Session, *, name: str = "tenant", rate_limit: float | None = None
) -> Account:
    """An account (no key): for service-level tests."""
    return accounts.create_account(session=session, name=name, rate_limit=rate_limit)


class Tenant:
    """An account with a live API key, made fresh for each test (tests never share one)."""

    def __init__(
        self, sessions: sessionmaker[Session], name: str = "tenant", rate: float | None = None
    ) -> None:
        with transaction(sessions) as session:
            account = make_account(session, name=name, rate_limit=rate)
            issued = accounts.create_key(session=session, account_id=account.id)
        self.id = account.id
        self.key = issued.key
        self.key_id = issued.id
        self.webhook_secret = account.webhook_secret

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def new_batch(
    *,
    recipients: int = 1,
    destinations: Sequence[str] | None = None,
    send_at: datetime | None = None,
    **fields: Any,
) -> batches.NewBatch:
    """What the API would hand to ``create_batch``, with test defaults."""
    values: dict[str, Any] = {
        "sender": "Dispatcher",
        "body": "hello",
        "destinations": list(destinations) if destinations is not None else numbers(recipients),
        "channels": ["sms"],
        "send_at": send_at,
        **fields,
    }
    return batches.NewBatch(**values)


def make_batch(
    session: Session,
    *,
    settings: Settings,
    account: Account,
    status: BatchStatus | None = None,
    recipients: int = 1,
    recipient_status: RecipientStatus | None = None,
    send_at: datetime | None = None,
    **fields: Any,
) -> Batch:
    """A batch of ``recipients`` recipients, a day ahead unless ``send_at``.

    The batch is as intake leaves it (``scheduled``, or ``queued`` when due within
    the horizon) unless ``status`` says otherwise; its recipients are ``scheduled``
    unless ``recipient_status`` does.
    """
    send_at = send_at or utcnow() + timedelta(days=1)
    new = new_batch(recipients=recipients, send_at=send_at, **fields)
    batch = batches.create_batch(session=session, settings=settings, account=account, new=new).batch
    if status is not None and batch.status != status:
        batch.status = status
        session.flush()
    if recipient_status is not None:
        session.execute(
            update(Recipient).where(Recipient.batch_id == batch.id).values(status=recipient_status)
        )
        session.flush()
    return batch


def sending_batch(
    session: Session,
    *,
    settings: Settings,
    name: str,
    recipients: int,
    recipient_status: RecipientStatus,
    **fields: Any,
) -> tuple[str, list[str]]:
    """A sending batch of a new account ``name``, its recipients in ``recipient_status``:
    (batch id, recipient ids in ``seq`` order)."""
    batch = make_batch(
        session,
        settings=settings,
        account=make_account(session, name=name),
        status=BatchStatus.SENDING,
        recipients=recipients,
        recipient_status=recipient_status,
        **fields,
    )
    ids = session.scalars(
        select(Recipient.id).where(Recipient.batch_id == batch.id).order_by(Recipient.seq)
    )
    return batch.id, list(ids)
