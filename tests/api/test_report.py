"""GET /batch/<id>/report: the summary per state and one page of recipients."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.test import TestResponse

from dispatcher.batches.models import Batch, Recipient
from dispatcher.db import transaction
from dispatcher.states import BatchStatus, RecipientStatus
from tests.factories import Tenant

R = RecipientStatus
ERROR_KEYS = {"code", "message", "errorId", "timestamp"}
ROW_KEYS = {"messageUuid", "to", "status", "channel", "error", "updatedAt", "id"}
# The final state of each recipient, in batch order.
OUTCOMES = [R.DELIVERED, R.DELIVERED, R.FAILED, R.SENT, R.EXPIRED]


def numbers(count: int) -> list[str]:
    return [f"+44770090{i:04d}" for i in range(count)]


def make_batch(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    outcomes: list[RecipientStatus] | None = None,
    **extra: Any,
) -> str:
    """A batch whose recipients ended in ``outcomes`` (as the engine would leave them)."""
    outcomes = OUTCOMES if outcomes is None else outcomes
    reply = client.post(
        "/batch",
        json={
            "from": "Dispatcher",
            "message": "hello",
            "destinations": numbers(len(outcomes)),
            "channel": "rcs",
            "fallback_channels": ["sms"],
            **extra,
        },
        headers=tenant.auth,
    )
    assert reply.status_code == 200, reply.get_json()
    batch_id = str(reply.get_json()["identifier"])
    with transaction(sessions) as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        batch.status = BatchStatus.SENDING
        rows = session.scalars(
            select(Recipient).where(Recipient.batch_id == batch_id).order_by(Recipient.seq)
        )
        for rec, status in zip(rows, outcomes, strict=True):
            rec.status = status
            if status is R.FAILED:
                rec.channel, rec.error_code, rec.error_text = "sms", "invalid", "number invalid"
    return batch_id


def report(client: FlaskClient, tenant: Tenant, batch_id: str, query: str = "") -> TestResponse:
    return client.get(f"/batch/{batch_id}/report{query}", headers=tenant.auth)


def refused(response: TestResponse, status: int, *names: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert isinstance(body, dict) and set(body) == ERROR_KEYS, body
    for name in names:
        assert name in body["message"], (name, body["message"])


def test_report_summarises_every_state_and_lists_recipients_in_order(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    batch_id = make_batch(client, sessions, tenant)

    reply = report(client, tenant, batch_id)

    assert reply.status_code == 200, reply.get_json()
    body = reply.get_json()
    assert list(body) == [
        "batchUuid",
        "status",
        "summary",
        "recipients",
        "page",
        "pageSize",
        "total",
    ]
    assert (body["batchUuid"], body["status"]) == (batch_id, "sending")
    assert body["summary"] == {
        **{s.value: 0 for s in RecipientStatus},
        "delivered": 2,
        "failed": 1,
        "sent": 1,
        "expired": 1,
    }
    assert (body["page"], body["pageSize"], body["total"]) == (0, 100, 5)
    rows = body["recipients"]
    assert [r["to"] for r in rows] == numbers(5)
    assert [r["status"] for r in rows] == [s.value for s in OUTCOMES]
    assert all(set(r) == ROW_KEYS for r in rows)
    assert rows[2]["error"] == {"code": "invalid", "text": "number invalid"}
    assert rows[2]["channel"] == "sms" and rows[0]["channel"] == "rcs"
    assert rows[0]["error"] is None
    assert all(r["updatedAt"].endswith("Z") for r in rows)
    datetime.fromisoformat(rows[0]["updatedAt"].replace("Z", "+00:00"))
    with sessions() as session:
        ids = session.scalars(
            select(Recipient.id).where(Recipient.batch_id == batch_id).order_by(Recipient.seq)
        ).all()
    assert [r["messageUuid"] for r in rows] == list(ids)


def test_report_pages_from_zero_and_filters_by_status(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    batch_id = make_batch(client, sessions, tenant)

    pages = [
        report(client, tenant, batch_id, f"?page={p}&pageSize=2").get_json() for p in (0, 1, 2, 3)
    ]

    assert [len(p["recipients"]) for p in pages] == [2, 2, 1, 0]
    assert [r["to"] for p in pages for r in p["recipients"]] == numbers(5)
    assert {p["total"] for p in pages} == {5}
    assert all(p["summary"]["delivered"] == 2 for p in pages)  # the summary is the batch's
    delivered = report(client, tenant, batch_id, "?status=delivered").get_json()
    assert delivered["total"] == 2
    assert [r["to"] for r in delivered["recipients"]] == numbers(2)
    none = report(client, tenant, batch_id, "?status=cancelled").get_json()
    assert (none["total"], none["recipients"]) == (0, [])


def test_report_finds_the_batch_by_the_clients_id_and_shows_message_ids(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    batch_id = make_batch(client, sessions, tenant, [R.SENT], id="my-order-42")
    body = report(client, tenant, "my-order-42").get_json()
    assert body["batchUuid"] == batch_id
    assert body["recipients"][0]["status"] == "sent"


def test_report_accepts_the_key_in_the_query(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    batch_id = make_batch(client, sessions, tenant, [R.DELIVERED])
    reply = client.get(f"/batch/{batch_id}/report?key={tenant.key}")
    assert reply.status_code == 200
    assert reply.get_json()["summary"]["delivered"] == 1


def test_another_accounts_batch_is_404(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant, other_tenant: Tenant
) -> None:
    theirs = make_batch(client, sessions, other_tenant, id="shared-client-id")
    refused(report(client, tenant, theirs), 404)
    refused(report(client, tenant, "shared-client-id"), 404)
    assert report(client, other_tenant, theirs).status_code == 200


def test_unknown_batch_is_404(client: FlaskClient, tenant: Tenant) -> None:
    refused(report(client, tenant, str(uuid.uuid4())), 404, "not found")


def test_report_needs_an_api_key(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    batch_id = make_batch(client, sessions, tenant, [R.SENT])
    refused(client.get(f"/batch/{batch_id}/report"), 401)
    refused(client.get(f"/batch/{batch_id}/report", headers={"Authorization": "Bearer x"}), 401)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("?status=bogus", "status"),
        ("?status=DELIVERED", "status"),
        ("?page=-1", "page"),
        ("?page=x", "page"),
        ("?pageSize=0", "pageSize"),
        ("?pageSize=1001", "pageSize"),
        ("?sort=to", "sort"),
    ],
)
def test_bad_query_is_400(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant, query: str, field: str
) -> None:
    batch_id = make_batch(client, sessions, tenant, [R.SENT])
    refused(report(client, tenant, batch_id, query), 400, field)
