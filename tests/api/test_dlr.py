"""POST /dlr/<provider>: carrier delivery receipts for the http provider.

Shared-secret authentication, validation that applies nothing on any error,
receipts for messages not sent yet kept (not dropped), final messages'
receipts acknowledged as ignored, and receipts that arrive out of order never
moving a message backwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.test import TestResponse

from api.app import create_app
from dispatcher import outbox
from dispatcher.batches.models import Batch, Recipient, StatusEvent
from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.receipts.models import PendingReceipt
from dispatcher.runtime import Runtime
from dispatcher.states import BatchStatus, RecipientStatus
from dispatcher.webhooks.models import Callback
from tests.factories import Tenant
from tests.helpers import RecordingPublisher

SECRET = "dlr-http-0123456789abcdef"
CARRIER = {"Authorization": f"Bearer {SECRET}"}
CALLBACK = "http://127.0.0.1:9/hooks"
ERROR_KEYS = {"code", "message", "errorId", "timestamp"}
R = RecipientStatus


@dataclass
class Api:
    client: FlaskClient
    sessions: sessionmaker[Session]
    publisher: RecordingPublisher

    def post(self, body: Any, headers: dict[str, str] | None = None) -> TestResponse:
        return self.client.post(
            "/dlr/http", json=body, headers=CARRIER if headers is None else headers
        )


@pytest.fixture()
def api(settings: Settings, publisher: RecordingPublisher) -> Iterator[Api]:
    """The API with a receipt secret configured for the http provider."""
    rt = Runtime(settings.replace(dlr_secrets={"http": SECRET}), publisher)
    yield Api(create_app(rt.settings, runtime=rt).test_client(), rt.sessions, publisher)
    rt.dispose()


@dataclass(frozen=True)
class Sent:
    batch_id: str
    recipient_id: str
    ref: str  # the carrier's message id


def sent_messages(api: Api, tenant: Tenant, count: int = 1) -> list[Sent]:
    """A batch (with a callback URL) whose recipients the carrier accepted."""
    reply = api.client.post(
        "/batch",
        json={
            "from": "Dispatcher",
            "message": "hello",
            "destinations": [f"+4477009{i:05d}" for i in range(count)],
            "callback": CALLBACK,
        },
        headers=tenant.auth,
    )
    assert reply.status_code == 200, reply.get_json()
    batch_id = reply.get_json()["identifier"]
    out = []
    now = utcnow()
    # What the send worker leaves behind: sent, with the carrier's id.
    with transaction(api.sessions) as session:
        session.execute(
            update(Batch).where(Batch.id == batch_id).values(status=BatchStatus.SENDING)
        )
        for rec in session.scalars(select(Recipient).where(Recipient.batch_id == batch_id)):
            rec.status, rec.provider_message_id = R.SENT, f"carrier-{uuid.uuid4().hex}"
            rec.provider = "http"
            rec.sent_at = rec.updated_at = now
            out.append(Sent(batch_id, rec.id, rec.provider_message_id))
    api.publisher.messages.clear()
    return out


def recipient(api: Api, sent: Sent) -> Recipient:
    with api.sessions() as session:
        row = session.get(Recipient, sent.recipient_id)
        assert row is not None
        return row


def events(api: Api, sent: Sent) -> list[str]:
    """The status events recorded for a recipient, in order."""
    with api.sessions() as session:
        return list(
            session.scalars(
                select(StatusEvent.status)
                .where(StatusEvent.recipient_id == sent.recipient_id)
                .order_by(StatusEvent.id)
            )
        )


def callbacks(api: Api, sent: Sent) -> list[Callback]:
    with api.sessions() as session:
        return list(
            session.scalars(select(Callback).where(Callback.recipient_id == sent.recipient_id))
        )


def published(api: Api) -> list[str]:
    return [
        cid
        for m in api.publisher.messages
        if isinstance(m, outbox.Message) and m.task == "deliver_callbacks"
        for cid in m.kwargs["callback_ids"]
    ]


def refused(response: TestResponse, status: int, *names: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert isinstance(body, dict) and set(body) == ERROR_KEYS, body
    for name in names:
        assert name in body["message"], (name, body["message"])
    return body


def assert_untouched(api: Api, *messages: Sent) -> None:
    """Nothing applied: still sent, no event, no callback, nothing published."""
    for m in messages:
        assert recipient(api, m).status == R.SENT
        assert events(api, m) == []
        assert callbacks(api, m) == []
    assert api.publisher.messages == []


# --- applying --------------------------------------------------------------------------


def test_delivered_receipt_is_applied_with_its_event_and_callback(api: Api, tenant: Tenant) -> None:
    (m,) = sent_messages(api, tenant)

    reply = api.post({"id": m.ref, "status": "delivered"})

    assert reply.status_code == 200, reply.get_json()
    assert reply.get_json() == {"applied": 1, "pending": 0, "ignored": 0}
    row = recipient(api, m)
    assert row.status == R.DELIVERED and row.error_code is None
    assert events(api, m) == ["delivered"]
    (cb,) = callbacks(api, m)
    assert cb.event_type == "message.delivered" and cb.url == CALLBACK
    assert cb.payload["status"] == "delivered" and cb.payload["messageUuid"] == m.recipient_id
    assert published(api) == [cb.id]


def test_a_list_applies_each_receipt_with_its_error(api: Api, tenant: Tenant) -> None:
    failed, expired, delivered = sent_messages(api, tenant, 3)

    reply = api.post(
        [
            {"id": failed.ref, "status": "failed", "error": {"code": "EC21", "text": "absent"}},
            {"id": expired.ref, "status": "expired"},
            {"id": delivered.ref, "status": "delivered", "error": None},
        ]
    )

    assert reply.get_json() == {"applied": 3, "pending": 0, "ignored": 0}
    row = recipient(api, failed)
    assert (row.status, row.error_code, row.error_text) == (R.FAILED, "EC21", "absent")
    row = recipient(api, expired)
    assert (row.status, row.error_code) == (R.EXPIRED, "expired")
    assert recipient(api, delivered).status == R.DELIVERED
    assert callbacks(api, failed)[0].payload["error"] == {"code": "EC21", "text": "absent"}
    assert len(published(api)) == 3


def test_a_receipt_for_no_sent_message_is_kept_not_dropped(api: Api, tenant: Tenant) -> None:
    """Its message may still be sending: the receipt waits, stored, for the outcome."""
    (m,) = sent_messages(api, tenant)

    reply = api.post(
        {"id": "carrier-not-yet-recorded", "status": "failed", "error": {"code": "EC1"}}
    )

    assert reply.status_code == 200
    assert reply.get_json() == {"applied": 0, "pending": 1, "ignored": 0}
    assert_untouched(api, m)
    with api.sessions() as session:
        (kept,) = session.scalars(
            select(PendingReceipt).where(
                PendingReceipt.provider_message_id == "carrier-not-yet-recorded"
            )
        ).all()
    assert (kept.provider, kept.status, kept.error_code) == ("http", "failed", "EC1")


@pytest.mark.parametrize(
    ("first", "late"),
    [
        ("delivered", "failed"),
        ("delivered", "expired"),
        ("failed", "delivered"),
        ("expired", "delivered"),
        ("delivered", "delivered"),
    ],
)
def test_a_late_receipt_never_moves_a_final_message(
    api: Api, tenant: Tenant, first: str, late: str
) -> None:
    (m,) = sent_messages(api, tenant)
    error = {"code": "first", "text": "the first receipt"}
    assert api.post({"id": m.ref, "status": first, "error": error}).get_json()["applied"] == 1
    before = recipient(api, m)
    api.publisher.messages.clear()

    reply = api.post({"id": m.ref, "status": late, "error": {"code": "late", "text": "late"}})

    assert reply.status_code == 200
    assert reply.get_json() == {"applied": 0, "pending": 0, "ignored": 1}
    after = recipient(api, m)
    assert after.status == R(first)
    assert (after.error_code, after.error_text, after.updated_at) == (
        before.error_code,
        before.error_text,
        before.updated_at,
    )
    assert events(api, m) == [first]
    assert len(callbacks(api, m)) == 1
    assert api.publisher.messages == []


def test_two_receipts_for_one_message_in_one_request_apply_the_first(
    api: Api, tenant: Tenant
) -> None:
    (m,) = sent_messages(api, tenant)

    reply = api.post([{"id": m.ref, "status": "delivered"}, {"id": m.ref, "status": "failed"}])

    assert reply.get_json() == {"applied": 1, "pending": 0, "ignored": 1}
    assert recipient(api, m).status == R.DELIVERED
    assert events(api, m) == ["delivered"]


def test_delivered_then_read_in_one_request_both_apply_in_order(api: Api, tenant: Tenant) -> None:
    (m,) = sent_messages(api, tenant)

    reply = api.post([{"id": m.ref, "status": "delivered"}, {"id": m.ref, "status": "read"}])

    assert reply.get_json() == {"applied": 2, "pending": 0, "ignored": 0}
    assert recipient(api, m).status == R.READ
    assert events(api, m) == ["delivered", "read"]


def test_a_mixed_request_counts_applied_and_ignored(api: Api, tenant: Tenant) -> None:
    done, fresh = sent_messages(api, tenant, 2)
    api.post({"id": done.ref, "status": "delivered"})

    reply = api.post(
        [
            {"id": fresh.ref, "status": "delivered"},
            {"id": done.ref, "status": "failed"},
            {"id": "unknown-1", "status": "failed"},
        ]
    )

    assert reply.get_json() == {"applied": 1, "pending": 1, "ignored": 1}
    assert recipient(api, fresh).status == R.DELIVERED
    assert recipient(api, done).status == R.DELIVERED


def test_receipts_cross_no_tenant_boundary_in_the_reply(
    api: Api, tenant: Tenant, other_tenant: Tenant
) -> None:
    """Receipts are the carrier's, for any tenant; the reply reveals only counts."""
    mine, (theirs,) = sent_messages(api, tenant), sent_messages(api, other_tenant)

    reply = api.post(
        [{"id": mine[0].ref, "status": "delivered"}, {"id": theirs.ref, "status": "failed"}]
    )

    assert reply.get_json() == {"applied": 2, "pending": 0, "ignored": 0}
    assert callbacks(api, mine[0])[0].account_id == tenant.id
    assert callbacks(api, theirs)[0].account_id == other_tenant.id


def test_exactly_1000_receipts_are_accepted(api: Api) -> None:
    body = [{"id": f"unknown-{i}", "status": "delivered"} for i in range(1000)]
    assert api.post(body).get_json() == {"applied": 0, "pending": 1000, "ignored": 0}


# --- authentication --------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {SECRET}x"},
        {"Authorization": f"Bearer {SECRET[:-1]}"},
        {"Authorization": f"Basic {SECRET}"},
        {"Authorization": SECRET},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer sécret"},
    ],
)
def test_a_wrong_or_missing_secret_is_401_and_applies_nothing(
    api: Api, tenant: Tenant, headers: dict[str, str]
) -> None:
    (m,) = sent_messages(api, tenant)
    reply = api.post({"id": m.ref, "status": "delivered"}, headers=headers)
    refused(reply, 401, "secret")
    assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    assert_untouched(api, m)


def test_an_api_key_or_a_query_secret_is_not_a_receipt_secret(api: Api, tenant: Tenant) -> None:
    (m,) = sent_messages(api, tenant)
    body = {"id": m.ref, "status": "delivered"}
    refused(api.post(body, headers=tenant.auth), 401)
    refused(api.client.post(f"/dlr/http?key={SECRET}", json=body), 401)
    assert_untouched(api, m)


@pytest.mark.parametrize("provider", ["simulator", "smpp", "HTTP"])
def test_an_unknown_provider_is_404(api: Api, tenant: Tenant, provider: str) -> None:
    (m,) = sent_messages(api, tenant)
    reply = api.client.post(
        f"/dlr/{provider}", json={"id": m.ref, "status": "delivered"}, headers=CARRIER
    )
    refused(reply, 404, "provider")
    assert_untouched(api, m)


@pytest.mark.parametrize("secrets", [{}, {"http": ""}, {"smpp": SECRET}])
def test_a_provider_without_a_configured_secret_is_404(
    settings: Settings, secrets: dict[str, str]
) -> None:
    rt = Runtime(settings.replace(dlr_secrets=secrets), RecordingPublisher())
    try:
        client = create_app(rt.settings, runtime=rt).test_client()
        for headers in (CARRIER, {"Authorization": "Bearer "}, {}):
            reply = client.post(
                "/dlr/http", json={"id": "x", "status": "delivered"}, headers=headers
            )
            refused(reply, 404)
    finally:
        rt.dispose()


# --- validation ------------------------------------------------------------------------


def _valid(m: Sent) -> dict[str, Any]:
    return {"id": m.ref, "status": "delivered"}


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda m: {"status": "delivered"}, "id"),
        (lambda m: {"id": m.ref}, "status"),
        (lambda m: {"id": m.ref, "status": "seen"}, "status"),
        (lambda m: {"id": m.ref, "status": "DELIVERED"}, "status"),
        (lambda m: {"id": m.ref, "status": None}, "status"),
        (lambda m: {"id": "", "status": "delivered"}, "id"),
        (lambda m: {"id": "x" * 101, "status": "delivered"}, "id"),
        (lambda m: {"id": 12345, "status": "delivered"}, "id"),
        (lambda m: {**_valid(m), "error": "absent"}, "error"),
        (lambda m: {**_valid(m), "error": {"code": "x" * 33}}, "error.code"),
        (lambda m: {**_valid(m), "error": {"text": "x" * 501}}, "error.text"),
        (lambda m: {**_valid(m), "error": {"reason": "x"}}, "error.reason"),
        (lambda m: {**_valid(m), "timestamp": "2024-01-01T00:00:00Z"}, "timestamp"),
        (lambda m: [_valid(m), {"id": "other", "status": "seen"}], "1.status"),
        (lambda m: [_valid(m), "nope"], "1"),
        (lambda m: [], "receipts"),
        (lambda m: [_valid(m)] * 1001, "receipts"),
        (lambda m: "delivered", "body"),
        (lambda m: 5, "body"),
    ],
)
def test_invalid_input_is_400_and_applies_nothing(
    api: Api, tenant: Tenant, make: Any, field: str
) -> None:
    (m,) = sent_messages(api, tenant)
    refused(api.post(make(m)), 400, field)
    assert_untouched(api, m)


@pytest.mark.parametrize("data", [b"{not json", b"", b"null"])
def test_a_body_that_is_not_json_is_400(api: Api, tenant: Tenant, data: bytes) -> None:
    (m,) = sent_messages(api, tenant)
    reply = api.client.post(
        "/dlr/http", data=data, headers={**CARRIER, "Content-Type": "application/json"}
    )
    refused(reply, 400, "JSON")
    assert_untouched(api, m)


def test_nothing_is_written_by_a_refused_request(api: Api, tenant: Tenant) -> None:
    messages = sent_messages(api, tenant, 3)
    body = [_valid(m) for m in messages] + [{"id": "x", "status": "lost"}]
    refused(api.post(body), 400, "3.status")
    assert_untouched(api, *messages)
    with api.sessions() as session:
        assert (
            session.scalar(
                select(func.count())
                .select_from(StatusEvent)
                .where(StatusEvent.batch_id == messages[0].batch_id)
            )
            == 0
        )


def test_a_channel_failure_with_no_channel_left_fails_with_its_code(
    api: Api, tenant: Tenant
) -> None:
    [m] = sent_messages(api, tenant)
    error = {"code": "EC9", "text": "no route on this channel"}
    reply = api.post({"id": m.ref, "status": "channel_failed", "error": error})
    assert reply.get_json() == {"applied": 1, "pending": 0, "ignored": 0}
    row = recipient(api, m)
    assert (row.status, row.error_code, row.error_text) == (R.FAILED, *error.values())
    assert events(api, m)[-1] == "failed"
