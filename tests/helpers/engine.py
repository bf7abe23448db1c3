"""Helpers of the engine's tests: numbers by prefix, batches sent through the API or
written by the intake service, other tests' claims ended."""

from __future__ import annotations

from datetime import datetime

from flask.testing import FlaskClient
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.accounts.models import Account
from dispatcher.batches import service
from dispatcher.batches.models import Recipient
from dispatcher.config import Settings
from dispatcher.db import transaction
from dispatcher.states import RecipientStatus
from tests.factories import Tenant


def numbers(prefix: str, count: int, start: int = 0) -> list[str]:
    width = 12 - len(prefix.lstrip("+"))
    return [f"{prefix}{i:0{width}d}" for i in range(start, start + count)]


def send(api: FlaskClient, account: Tenant, destinations: list[str], **extra: object) -> str:
    body = {"from": "Dispatcher", "message": "hello", "destinations": destinations, **extra}
    reply = api.post("/batch?allowMulti=true", json=body, headers=account.auth)
    assert reply.status_code == 200, reply.get_json()
    return str(reply.get_json()["identifier"])


def create(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
    *,
    count: int = 3,
    send_at: datetime | None = None,
) -> str:
    """A batch written by the intake service (sms, ``count`` numbers); its id."""
    with transaction(sessions) as session:
        account = session.get(Account, tenant.id)
        assert account is not None
        new = service.NewBatch(
            sender="Acme",
            body="hi",
            channels=["sms"],
            send_at=send_at,
            destinations=[f"+4477009001{i:02d}" for i in range(count)],
        )
        return service.create_batch(
            session=session, settings=settings, account=account, new=new
        ).batch.id


def end_leftover_claims(sessions: sessionmaker[Session]) -> None:
    """End every claim still in ``sending``, before a test that counts what reclaim does.

    The tests of one xdist worker share a database, and reclaim takes every claim past
    its lease (6 s in the tests), not only the test's own: a claim another test left
    (a worker stand-in that never recorded) would be counted, and looked up at a carrier
    stand-in that knows nothing of it. Ended as reclaim ends a claim it cannot look up.
    """
    with transaction(sessions) as session:
        session.execute(
            update(Recipient)
            .where(Recipient.status == RecipientStatus.SENDING, Recipient.claimed_at.is_not(None))
            .values(status=RecipientStatus.UNKNOWN, claimed_at=None)
        )
