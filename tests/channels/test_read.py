"""The ``read`` status in every dialect: a native callback, and Sinch's report staying Delivered."""

from __future__ import annotations

from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.receipts.service import Receipt, accept
from dispatcher.states import RecipientStatus
from tests.factories import Tenant
from tests.helpers.sinch import A, B, callbacks, created, mark_sent, receipt, start_sending, url

R = RecipientStatus


def send_receipt(sessions: sessionmaker[Session], batch_id: str, number: str, status: str) -> int:
    """How many of one receipt applied (for a message the test recorded as the simulator's)."""
    with transaction(sessions) as session:
        return accept(
            session=session,
            provider="simulator",
            receipts=[Receipt(f"{number}:{batch_id}", status)],
            now=utcnow(),
        ).applied


def read(sessions: sessionmaker[Session], batch_id: str, number: str) -> int:
    return send_receipt(sessions, batch_id, number, "read")


def test_native_read_is_a_callback_a_status_and_a_count(
    client: FlaskClient, sessions: sessionmaker[Session], settings: Settings, tenant: Tenant
) -> None:
    reply = client.post(
        "/batch",
        json={
            "from": "Dispatcher",
            "message": "hi",
            "destinations": [A, B],
            "callback": "http://127.0.0.1:9/hooks",
        },
        headers=tenant.auth,
    )
    batch_id = reply.get_json()["identifier"]
    start_sending(sessions, settings, batch_id)
    mark_sent(sessions, batch_id, [A, B])
    receipt(sessions, batch_id, A, "delivered")
    assert read(sessions, batch_id, A) == 1
    # B's read overtook its delivery report: read it is, and the late delivery changes nothing.
    assert read(sessions, batch_id, B) == 1
    assert send_receipt(sessions, batch_id, B, "delivered") == 0
    assert read(sessions, batch_id, A) == 0
    events = [(c.event_type, c.payload["to"]) for c in callbacks(sessions, batch_id)]
    assert events.count(("message.read", A)) == 1
    assert events.count(("message.read", B)) == 1
    assert ("message.delivered", B) not in events
    read_payload = next(
        c.payload for c in callbacks(sessions, batch_id) if c.event_type == "message.read"
    )
    assert read_payload["status"] == "read" and read_payload["error"] is None
    body = client.get(f"/batch/{batch_id}", headers=tenant.auth).get_json()
    assert body["status"] == "completed"
    listing = client.get(f"/batch/{batch_id}/messages?status=read", headers=tenant.auth).get_json()
    assert listing["messages"] and {m["status"] for m in listing["messages"]} == {"read"}


def test_sinch_has_no_read_so_a_read_message_stays_delivered_with_no_new_report(
    client: FlaskClient, sessions: sessionmaker[Session], settings: Settings, tenant: Tenant
) -> None:
    batch = created(
        client,
        tenant,
        to=[A],
        delivery_report="per_recipient",
        callback_url="http://127.0.0.1:9/sinch",
    )
    start_sending(sessions, settings, batch["id"])
    mark_sent(sessions, batch["id"], [A])
    receipt(sessions, batch["id"], A, "delivered")
    before = len(callbacks(sessions, batch["id"]))
    assert read(sessions, batch["id"], A) == 1
    assert len(callbacks(sessions, batch["id"])) == before
    report = client.get(url(tenant, f"/{batch['id']}/delivery_report/{A}"), headers=tenant.auth)
    assert report.status_code == 200
    assert (report.get_json()["status"], report.get_json()["code"]) == ("Delivered", 0)
    summary = client.get(url(tenant, f"/{batch['id']}/delivery_report"), headers=tenant.auth)
    assert summary.get_json()["statuses"] == [{"code": 0, "status": "Delivered", "count": 1}]
