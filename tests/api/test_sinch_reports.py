"""Sinch dry run, delivery reports, delivery feedback and callbacks (Sinch's shapes)."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.config import Settings
from tests.factories import Tenant
from tests.helpers.sinch import (
    A,
    B,
    C,
    assert_error,
    callbacks,
    created,
    mark_sent,
    parse_time,
    receipt,
    start_sending,
    url,
)


def dry_run(client: FlaskClient, tenant: Tenant, query: str = "", **body: Any) -> Any:
    payload = {"from": "12345", "to": [A], "body": "Hello", **body}
    return client.post(url(tenant, "/dry_run" + query), json=payload, headers=tenant.auth)


# Hand-checked: GSM-7 holds 160 septets in one part, 153 per concatenated part; { and €
# are extension characters costing 2 septets and never split; UCS-2 holds 70 units, 67
# per part; an emoji outside the BMP costs 2 units and is never split.
PART_CASES = [
    ("Hello", "GSM", 1),
    ("a" * 160, "GSM", 1),
    ("a" * 161, "GSM", 2),
    ("{" * 80, "GSM", 1),  # 160 septets
    ("{" * 81, "GSM", 2),  # 162 septets: 76 + 5 characters
    ("Price: 5€", "GSM", 1),
    ("€" * 80, "GSM", 1),  # 160 septets
    ("€" * 81, "GSM", 2),  # 162 septets
    ("a" * 152 + "{", "GSM", 1),  # 154 septets fit one 160-septet part
    ("a" * 159 + "{", "GSM", 2),  # 161 septets: the escape pair moves to part two
    ("Hi 😀", "UNICODE", 1),
    ("😀" * 35, "UNICODE", 1),  # 70 units
    ("😀" * 36, "UNICODE", 2),  # 72 units: 33 + 3 emoji
    ("ą" * 70, "UNICODE", 1),
    ("ą" * 71, "UNICODE", 2),
    ("ą" * 134, "UNICODE", 2),
    ("ą" * 135, "UNICODE", 3),
]


@pytest.mark.parametrize(("body", "encoding", "parts"), PART_CASES)
def test_dry_run_part_counts(
    client: FlaskClient, tenant: Tenant, body: str, encoding: str, parts: int
) -> None:
    response = dry_run(client, tenant, "?per_recipient=true", body=body, to=[A, B])
    assert response.status_code == 200, response.get_json()
    data = response.get_json()
    assert data["number_of_recipients"] == 2
    assert data["number_of_messages"] == 2 * parts
    assert data["per_recipient"] == [
        {"recipient": A, "number_of_parts": parts, "body": body, "encoding": encoding},
        {"recipient": B, "number_of_parts": parts, "body": body, "encoding": encoding},
    ]


def test_dry_run_renders_parameters_and_limits_details(client: FlaskClient, tenant: Tenant) -> None:
    params = {"name": {A: "Joe", B: "Zoë", "default": "😀"}}
    response = dry_run(
        client, tenant, "?per_recipient=true", to=[A, B, C], body="Hi ${name}", parameters=params
    )
    data = response.get_json()
    assert set(data) == {"number_of_recipients", "number_of_messages", "per_recipient"}
    assert data["per_recipient"] == [
        {"recipient": A, "number_of_parts": 1, "body": "Hi Joe", "encoding": "GSM"},
        {"recipient": B, "number_of_parts": 1, "body": "Hi Zoë", "encoding": "UNICODE"},
        {"recipient": C, "number_of_parts": 1, "body": "Hi 😀", "encoding": "UNICODE"},
    ]
    short = dry_run(
        client,
        tenant,
        "?per_recipient=true&number_of_recipients=1",
        to=[A, B, C],
        body="x" * 200,
    ).get_json()
    assert (short["number_of_recipients"], short["number_of_messages"]) == (3, 6)
    assert [p["recipient"] for p in short["per_recipient"]] == [A]
    plain = dry_run(client, tenant, to=[A, B]).get_json()
    assert plain == {"number_of_recipients": 2, "number_of_messages": 2}
    truncated = dry_run(
        client,
        tenant,
        "?per_recipient=true",
        body="€" * 100,
        max_number_of_message_parts=1,
        truncate_concat=True,
    ).get_json()
    assert truncated["per_recipient"][0]["body"] == "€" * 80
    assert truncated["number_of_messages"] == 1
    assert_error(
        dry_run(client, tenant, "?number_of_recipients=1001"), 400, "syntax_constraint_violation"
    )


def test_dry_run_writes_nothing(client: FlaskClient, tenant: Tenant) -> None:
    assert dry_run(client, tenant).status_code == 200
    assert client.get(url(tenant), headers=tenant.auth).get_json()["count"] == 0


# --- delivery reports ---------------------------------------------------------------------


def test_delivery_reports_through_the_engine(
    client: FlaskClient, tenant: Tenant, sessions: sessionmaker[Session], settings: Settings
) -> None:
    batch = created(client, tenant, to=[A, B, C], client_reference="ref-9", body="Hi 😀")
    bid = batch["id"]
    report = client.get(url(tenant, f"/{bid}/delivery_report"), headers=tenant.auth).get_json()
    assert report == {
        "type": "delivery_report_sms",
        "batch_id": bid,
        "total_message_count": 3,
        "statuses": [{"code": 400, "status": "Queued", "count": 3}],
        "client_reference": "ref-9",
    }
    start_sending(sessions, settings, bid)
    mark_sent(sessions, bid, [A, B, C])
    receipt(sessions, bid, A, "delivered")
    receipt(sessions, bid, B, "failed", "undeliverable")
    full = client.get(url(tenant, f"/{bid}/delivery_report?type=full"), headers=tenant.auth)
    assert full.status_code == 200
    assert full.get_json()["statuses"] == [
        {"code": 0, "status": "Delivered", "count": 1, "recipients": [A]},
        {"code": 254, "status": "Failed", "count": 1, "recipients": [B]},
        {"code": 401, "status": "Dispatched", "count": 1, "recipients": [C]},
    ]
    only = client.get(
        url(tenant, f"/{bid}/delivery_report?type=full&status=Delivered,Dispatched&code=401"),
        headers=tenant.auth,
    ).get_json()
    assert only["statuses"] == [
        {"code": 401, "status": "Dispatched", "count": 1, "recipients": [C]}
    ]
    assert only["total_message_count"] == 3
    bad = client.get(url(tenant, f"/{bid}/delivery_report?status=Lost"), headers=tenant.auth)
    assert_error(bad, 400, "syntax_constraint_violation")
    one = client.get(url(tenant, f"/{bid}/delivery_report/{A[1:]}"), headers=tenant.auth)
    assert one.status_code == 200
    body = one.get_json()
    assert set(body) == {
        "type",
        "batch_id",
        "recipient",
        "code",
        "status",
        "at",
        "operator_status_at",
        "applied_originator",
        "client_reference",
        "number_of_message_parts",
        "encoding",
    }
    assert (body["type"], body["batch_id"], body["recipient"]) == (
        "recipient_delivery_report_sms",
        bid,
        A,
    )
    assert (body["code"], body["status"], body["encoding"]) == (0, "Delivered", "UNICODE")
    assert body["number_of_message_parts"] == 1 and body["applied_originator"] == "12345"
    parse_time(body["at"])
    missing = client.get(url(tenant, f"/{bid}/delivery_report/+447700900999"), headers=tenant.auth)
    assert_error(missing, 404, "not_found")
    assert_error(
        client.get(url(tenant, f"/{bid}/delivery_report/abc"), headers=tenant.auth),
        400,
        "syntax_invalid_parameter_format",
    )


def test_cancelled_batch_reports_cancelled(client: FlaskClient, tenant: Tenant) -> None:
    bid = created(client, tenant, to=[A, B], send_at="2099-01-01T00:00:00Z")["id"]
    assert client.delete(url(tenant, f"/{bid}"), headers=tenant.auth).status_code == 200
    report = client.get(url(tenant, f"/{bid}/delivery_report"), headers=tenant.auth).get_json()
    assert report["statuses"] == [{"code": 407, "status": "Cancelled", "count": 2}]
    assert "client_reference" not in report


# --- delivery feedback --------------------------------------------------------------------


def test_delivery_feedback(
    client: FlaskClient, tenant: Tenant, sessions: sessionmaker[Session], settings: Settings
) -> None:
    plain = created(client, tenant)["id"]
    response = client.post(
        url(tenant, f"/{plain}/delivery_feedback"), json={"recipients": []}, headers=tenant.auth
    )
    assert "feedback_enabled" in assert_error(response, 400, "syntax_constraint_violation")
    bid = created(client, tenant, to=[A, B], feedback_enabled=True)["id"]
    start_sending(sessions, settings, bid)
    mark_sent(sessions, bid, [A, B])
    missing_key = client.post(
        url(tenant, f"/{bid}/delivery_feedback"), json={}, headers=tenant.auth
    )
    assert_error(missing_key, 400, "syntax_constraint_violation")
    response = client.post(
        url(tenant, f"/{bid}/delivery_feedback"), json={"recipients": [B]}, headers=tenant.auth
    )
    assert response.status_code == 202 and response.get_data() == b""
    full = client.get(url(tenant, f"/{bid}/delivery_report?type=full"), headers=tenant.auth)
    assert full.get_json()["statuses"] == [
        {"code": 0, "status": "Delivered", "count": 1, "recipients": [B]},
        {"code": 401, "status": "Dispatched", "count": 1, "recipients": [A]},
    ]
    everyone = client.post(
        url(tenant, f"/{bid}/delivery_feedback"), json={"recipients": []}, headers=tenant.auth
    )
    assert everyone.status_code == 202
    summary = client.get(url(tenant, f"/{bid}/delivery_report"), headers=tenant.auth).get_json()
    assert summary["statuses"] == [{"code": 0, "status": "Delivered", "count": 2}]


# --- callbacks ----------------------------------------------------------------------------

CB = "http://127.0.0.1:9/dlr"


def run_batch(
    client: FlaskClient,
    tenant: Tenant,
    sessions: sessionmaker[Session],
    settings: Settings,
    mode: str,
) -> str:
    """A batch of A and B: both sent, A delivered, B failed."""
    bid = created(
        client, tenant, to=[A, B], delivery_report=mode, callback_url=CB, client_reference="c"
    )["id"]
    start_sending(sessions, settings, bid)
    mark_sent(sessions, bid, [A, B])
    receipt(sessions, bid, A, "delivered")
    receipt(sessions, bid, B, "failed", "undeliverable")
    return bid


def test_callbacks_none(
    client: FlaskClient, tenant: Tenant, sessions: sessionmaker[Session], settings: Settings
) -> None:
    bid = run_batch(client, tenant, sessions, settings, "none")
    assert callbacks(sessions, bid) == []


def test_callbacks_per_recipient_every_change(
    client: FlaskClient, tenant: Tenant, sessions: sessionmaker[Session], settings: Settings
) -> None:
    bid = run_batch(client, tenant, sessions, settings, "per_recipient")
    rows = callbacks(sessions, bid)
    seen = [(cb.payload["recipient"], cb.payload["status"], cb.payload["code"]) for cb in rows]
    assert sorted(seen) == sorted(
        [
            (A, "Queued", 400),
            (B, "Queued", 400),
            (A, "Dispatched", 401),
            (B, "Dispatched", 401),
            (A, "Delivered", 0),
            (B, "Failed", 254),
        ]
    )
    for cb in rows:
        assert cb.url == CB and cb.event_type == "recipient_delivery_report_sms"
        assert {"type", "batch_id", "recipient", "code", "status", "at"} <= set(cb.payload)
        assert cb.payload["batch_id"] == bid and cb.payload["client_reference"] == "c"
        parse_time(cb.payload["at"])


def test_callbacks_per_recipient_final_only_final(
    client: FlaskClient, tenant: Tenant, sessions: sessionmaker[Session], settings: Settings
) -> None:
    bid = run_batch(client, tenant, sessions, settings, "per_recipient_final")
    seen = sorted(
        (cb.payload["recipient"], cb.payload["status"]) for cb in callbacks(sessions, bid)
    )
    assert seen == [(A, "Delivered"), (B, "Failed")]


@pytest.mark.parametrize("mode", ["summary", "full"])
def test_callbacks_summary_once_when_final(
    client: FlaskClient,
    tenant: Tenant,
    sessions: sessionmaker[Session],
    settings: Settings,
    mode: str,
) -> None:
    bid = run_batch(client, tenant, sessions, settings, mode)
    rows = callbacks(sessions, bid)
    assert len(rows) == 1
    assert rows[0].event_type == "delivery_report_sms" and rows[0].recipient_id is None
    delivered: dict[str, Any] = {"code": 0, "status": "Delivered", "count": 1}
    failed: dict[str, Any] = {"code": 254, "status": "Failed", "count": 1}
    if mode == "full":
        delivered["recipients"], failed["recipients"] = [A], [B]
    assert rows[0].payload == {
        "type": "delivery_report_sms",
        "batch_id": bid,
        "total_message_count": 2,
        "statuses": [delivered, failed],
        "client_reference": "c",
    }


def test_summary_callback_on_cancel(
    client: FlaskClient, tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    bid = created(
        client,
        tenant,
        to=[A, B],
        delivery_report="summary",
        callback_url=CB,
        send_at="2099-01-01T00:00:00Z",
    )["id"]
    assert callbacks(sessions, bid) == []
    client.delete(url(tenant, f"/{bid}"), headers=tenant.auth)
    rows = callbacks(sessions, bid)
    assert [cb.payload["statuses"] for cb in rows] == [
        [{"code": 407, "status": "Cancelled", "count": 2}]
    ]
