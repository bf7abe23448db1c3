"""Helpers of the engine's tests: numbers by prefix, batches sent through the API or
written by the intake service."""

from __future__ import annotations

from datetime import datetime

from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.accounts.models import Account
from dispatcher.batches import service
from dispatcher.config import Settings
from dispatcher.db import transaction
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
