"""Shared helpers of the Sinch API tests: URLs, requests and moving batches through the engine."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.batches.models import Batch, Recipient
from dispatcher.batches.transitions import transition_recipients
from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.engine.scheduling import complete_if_done, dispatch_batch
from dispatcher.receipts.service import Receipt, accept
from dispatcher.states import RecipientStatus
from tests.helpers.reads import callbacks as callbacks
from tests.helpers.reads import recipients as recipients

A, B, C = "+447700900001", "+447700900002", "+447700900003"

# Every field a Sinch batch object may carry, and which of them are always present.
BATCH_FIELDS = {
    "id": str,
    "to": list,
    "from": str,
    "canceled": bool,
    "parameters": dict,
    "body": str,
    "type": str,
    "udh": str,
    "created_at": str,
    "modified_at": str,
    "delivery_report": str,
    "send_at": str,
    "expire_at": str,
    "callback_url": str,
    "client_reference": str,
    "feedback_enabled": bool,
    "flash_message": bool,
    "truncate_concat": bool,
    "max_number_of_message_parts": int,
    "from_ton": int,
    "from_npi": int,
}
ALWAYS = {
    "id",
    "to",
    "from",
    "canceled",
    "body",
    "type",
    "created_at",
    "modified_at",
    "delivery_report",
    "send_at",
    "expire_at",
    "feedback_enabled",
    "flash_message",
}


def url(tenant: Any, suffix: str = "") -> str:
    return f"/xms/v1/{tenant.id}/batches{suffix}"


def send(client: FlaskClient, tenant: Any, **body: Any) -> Any:
    payload = {"from": "12345", "to": [A], "body": "Hello", **body}
    return client.post(url(tenant), json=payload, headers=tenant.auth)


def created(client: FlaskClient, tenant: Any, **body: Any) -> dict[str, Any]:
    response = send(client, tenant, **body)
    assert response.status_code == 201, response.get_json()
    data: dict[str, Any] = response.get_json()
    return data


def parse_time(text: str) -> datetime:
    """Sinch's YYYY-MM-DDThh:mm:ss.SSSZ, as naive UTC."""
    assert text.endswith("Z") and len(text) == 24, text
    return datetime.fromisoformat(text[:-1])


def assert_batch_shape(data: dict[str, Any]) -> None:
    """Field names and JSON types of a Sinch batch object (Sinch "Batches")."""
    assert set(data) >= ALWAYS, ALWAYS - set(data)
    assert set(data) <= set(BATCH_FIELDS), set(data) - set(BATCH_FIELDS)
    for name, value in data.items():
        assert isinstance(value, BATCH_FIELDS[name]), (name, value)
    for name in ("created_at", "modified_at", "send_at", "expire_at"):
        parse_time(data[name])
    assert all(isinstance(to, str) for to in data["to"])


def assert_error(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"code", "text"}, body
    assert body["code"] == code, body
    assert isinstance(body["text"], str) and body["text"]
    return str(body["text"])


def start_sending(sessions: sessionmaker[Session], settings: Settings, batch_id: str) -> None:
    """Run the engine's dispatch: the batch starts sending, its recipients are queued."""
    with transaction(sessions) as session:
        session.execute(update(Batch).where(Batch.id == batch_id).values(send_at=utcnow()))
        assert dispatch_batch(session=session, settings=settings, batch_id=batch_id, now=utcnow())


def mark_sent(sessions: sessionmaker[Session], batch_id: str, numbers: list[str]) -> None:
    """What a worker records when the carrier accepts: sent, with a provider id."""
    now = utcnow()
    mine = [Recipient.batch_id == batch_id, Recipient.to.in_(numbers)]
    with transaction(sessions) as session:
        # Claimed, then accepted: the two moves a worker makes.
        transition_recipients(
            session=session,
            to=RecipientStatus.SENDING,
            where=mine,
            values={"claimed_at": now},
            at=now,
            record=False,
        )
        transition_recipients(
            session=session,
            to=RecipientStatus.SENT,
            where=mine,
            values={
                "sent_at": now,
                "provider": "simulator",
                "provider_message_id": Recipient.to + ":" + batch_id,
            },
            at=now,
        )
        complete_if_done(session=session, batch_id=batch_id, now=now)


def receipt(
    sessions: sessionmaker[Session],
    batch_id: str,
    number: str,
    status: str,
    error_code: str | None = None,
) -> None:
    """A carrier's delivery receipt, applied by the receipts service."""
    with transaction(sessions) as session:
        accepted = accept(
            session=session,
            provider="simulator",
            receipts=[Receipt(f"{number}:{batch_id}", status, error_code)],
            now=utcnow(),
        )
        assert accepted.applied == 1
