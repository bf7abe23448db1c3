"""Sinch "Batches" over HTTP: send, get, list, update, replace, cancel, auth, errors."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.config import Settings
from dispatcher.db import utcnow
from tests.factories import Tenant
from tests.helpers.sinch import (
    A,
    B,
    C,
    assert_batch_shape,
    assert_error,
    created,
    mark_sent,
    parse_time,
    receipt,
    recipients,
    send,
    start_sending,
    url,
)

FUTURE = (utcnow() + timedelta(days=1)).isoformat(timespec="seconds") + "Z"


def iso(delta: timedelta) -> str:
    return (utcnow() + delta).isoformat(timespec="milliseconds") + "Z"


# --- send -----------------------------------------------------------------------------


def test_send_returns_201_and_the_full_batch_object(client: FlaskClient, tenant: Tenant) -> None:
    data = created(
        client,
        tenant,
        to=["447700900001", B],
        delivery_report="summary",
        callback_url="http://127.0.0.1:9/cb",
        client_reference="ref-1",
        send_at=FUTURE,
        feedback_enabled=True,
        flash_message=True,
        truncate_concat=False,
        max_number_of_message_parts=3,
        from_ton=5,
        from_npi=0,
    )
    assert_batch_shape(data)
    assert data["to"] == [A, B]
    assert data["from"] == "12345"
    assert data["body"] == "Hello"
    assert data["type"] == "mt_text"
    assert data["canceled"] is False
    assert data["delivery_report"] == "summary"
    assert data["callback_url"] == "http://127.0.0.1:9/cb"
    assert data["client_reference"] == "ref-1"
    assert data["feedback_enabled"] is True and data["flash_message"] is True
    assert data["truncate_concat"] is False
    assert data["max_number_of_message_parts"] == 3
    assert (data["from_ton"], data["from_npi"]) == (5, 0)
    assert data["send_at"] == FUTURE.replace("Z", ".000Z")
    assert parse_time(data["expire_at"]) - parse_time(data["send_at"]) == timedelta(days=3)


def test_send_defaults_and_unset_fields_left_out(client: FlaskClient, tenant: Tenant) -> None:
    before = utcnow()
    data = created(client, tenant)
    assert_batch_shape(data)
    assert data["delivery_report"] == "none"
    assert data["type"] == "mt_text"
    assert data["feedback_enabled"] is False and data["flash_message"] is False
    for absent in ("callback_url", "client_reference", "parameters", "udh", "truncate_concat"):
        assert absent not in data
    send_at = parse_time(data["send_at"])
    assert before - timedelta(seconds=1) <= send_at <= utcnow() + timedelta(seconds=1)
    # send_at is "now" as the intake transaction saw it, a few ms after the defaults.
    expiry = parse_time(data["expire_at"]) - send_at
    assert timedelta(days=3) - timedelta(seconds=1) < expiry <= timedelta(days=3)
    assert data["created_at"] <= data["modified_at"]


def test_send_at_in_the_past_means_now(client: FlaskClient, tenant: Tenant) -> None:
    data = created(client, tenant, send_at=iso(-timedelta(hours=5)))
    assert abs(parse_time(data["send_at"]) - utcnow()) < timedelta(seconds=5)


def test_expire_at_at_most_three_days_after_send_at(client: FlaskClient, tenant: Tenant) -> None:
    send_at = utcnow() + timedelta(hours=1)
    ok = created(
        client,
        tenant,
        send_at=send_at.isoformat() + "Z",
        expire_at=(send_at + timedelta(days=3)).isoformat() + "Z",
    )
    assert parse_time(ok["expire_at"]) - parse_time(ok["send_at"]) == timedelta(days=3)
    text = assert_error(
        send(
            client,
            tenant,
            send_at=send_at.isoformat() + "Z",
            expire_at=(send_at + timedelta(days=3, seconds=1)).isoformat() + "Z",
        ),
        400,
        "syntax_constraint_violation",
    )
    assert "3 days" in text
    assert_error(
        send(client, tenant, send_at=send_at.isoformat() + "Z", expire_at=iso(timedelta(0))),
        400,
        "syntax_constraint_violation",
    )


def test_send_validation_errors_in_sinch_shape(client: FlaskClient, tenant: Tenant) -> None:
    assert_error(send(client, tenant, to=[]), 400, "syntax_constraint_violation")
    assert_error(send(client, tenant, to=["not-a-number"]), 400, "syntax_invalid_parameter_format")
    assert_error(send(client, tenant, delivery_report="all"), 400, "syntax_constraint_violation")
    assert_error(send(client, tenant, type="mt_media"), 400, "syntax_constraint_violation")
    assert_error(
        send(client, tenant, flash_message="yes please"), 400, "syntax_invalid_parameter_format"
    )
    assert_error(send(client, tenant, unknown_field=1), 400, "syntax_constraint_violation")
    too_many = [f"+4477009{n:05d}" for n in range(1001)]
    assert_error(send(client, tenant, to=too_many), 400, "syntax_constraint_violation")
    missing = client.post(url(tenant), json={"to": [A], "body": "x"}, headers=tenant.auth)
    assert "from" in assert_error(missing, 400, "syntax_constraint_violation")
    broken = client.post(
        url(tenant), data="{not json", headers={**tenant.auth, "Content-Type": "application/json"}
    )
    assert_error(broken, 400, "syntax_invalid_json")


def test_mt_binary_validated_then_refused_until_a_provider_carries_it(
    client: FlaskClient, tenant: Tenant
) -> None:
    refused = send(client, tenant, type="mt_binary", body="SGVsbG8=", udh="050003CC0201")
    assert "carries text only" in assert_error(refused, 400, "syntax_constraint_violation")
    # Refused with nothing written.
    assert client.get(url(tenant), headers=tenant.auth).get_json()["count"] == 0
    dry = client.post(
        url(tenant, "/dry_run"),
        json={"from": "1", "to": [A], "type": "mt_binary", "body": "SGVsbG8=", "udh": "0500"},
        headers=tenant.auth,
    )
    assert dry.status_code == 200 and dry.get_json()["number_of_messages"] == 1
    assert "udh" in assert_error(
        send(client, tenant, type="mt_binary", body="SGVsbG8="), 400, "syntax_constraint_violation"
    )
    assert_error(
        send(client, tenant, type="mt_binary", body="not base64!", udh="00"),
        400,
        "syntax_invalid_parameter_format",
    )
    # 184 base64 characters are 138 bytes: with a 2-byte udh exactly 140.
    ok = send(client, tenant, type="mt_binary", body="QUFB" * 46, udh="0500")
    assert "mt_binary cannot be sent" in assert_error(ok, 400, "syntax_constraint_violation")
    over = send(client, tenant, type="mt_binary", body="QUFB" * 46, udh="050003")
    assert "140" in assert_error(over, 400, "syntax_constraint_violation")
    assert_error(send(client, tenant, udh="0500"), 400, "syntax_constraint_violation")


def test_parameters_render_per_recipient_bodies(
    client: FlaskClient, tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    parameters = {"name": {"447700900001": "Joe", B: "Ann", "default": "there"}}
    data = created(
        client, tenant, to=[A, B, C], body="Hi ${name}! ${unknown} stays", parameters=parameters
    )
    assert data["body"] == "Hi ${name}! ${unknown} stays"
    assert data["parameters"] == {"name": {A: "Joe", B: "Ann", "default": "there"}}
    bodies = [r.body for r in recipients(sessions, data["id"])]
    assert bodies == [
        "Hi Joe! ${unknown} stays",
        "Hi Ann! ${unknown} stays",
        "Hi there! ${unknown} stays",
    ]
    # No value and no default: only that recipient fails (Sinch's 405), the batch is accepted.
    no_default = created(
        client, tenant, to=[A, C], body="Hi ${name}", parameters={"name": {A: "Joe"}}
    )
    rows = recipients(sessions, no_default["id"])
    assert [(r.to, r.status, r.error_code) for r in rows] == [
        (A, "scheduled", None),
        (C, "rejected", "parameter_missing"),
    ]


def test_max_parts_fails_the_recipient_and_truncate_concat_cuts(
    client: FlaskClient, tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    long = "a" * 200
    over = created(client, tenant, body=long, max_number_of_message_parts=1)
    assert [(r.status, r.error_code) for r in recipients(sessions, over["id"])] == [
        ("rejected", "parts_limit")
    ]
    data = created(client, tenant, body=long, max_number_of_message_parts=1, truncate_concat=True)
    assert data["body"] == "a" * 160
    assert [r.parts for r in recipients(sessions, data["id"])] == [1]


# --- auth and tenancy -------------------------------------------------------------------


def test_bearer_token_required(client: FlaskClient, tenant: Tenant) -> None:
    assert_error(client.get(url(tenant)), 401, "unauthorized")
    bad = client.get(url(tenant), headers={"Authorization": "Bearer nope"})
    assert_error(bad, 401, "unauthorized")


def test_token_with_another_service_plan_is_forbidden(
    client: FlaskClient, tenant: Tenant, other_tenant: Tenant
) -> None:
    response = client.get(url(other_tenant), headers=tenant.auth)
    assert other_tenant.id in assert_error(response, 403, "forbidden")
    response = client.post(
        url(other_tenant), json={"to": [A], "from": "x", "body": "y"}, headers=tenant.auth
    )
    assert_error(response, 403, "forbidden")


def test_another_accounts_batch_is_not_found(
    client: FlaskClient, tenant: Tenant, other_tenant: Tenant
) -> None:
    theirs = created(client, other_tenant)["id"]
    for method in ("get", "delete"):
        response = getattr(client, method)(url(tenant, f"/{theirs}"), headers=tenant.auth)
        assert_error(response, 404, "not_found")
    response = client.post(url(tenant, f"/{theirs}"), json={"body": "x"}, headers=tenant.auth)
    assert_error(response, 404, "not_found")
    assert client.get(url(other_tenant, f"/{theirs}"), headers=other_tenant.auth).status_code == 200


# --- get and list ------------------------------------------------------------------------


def test_get_returns_what_send_returned(client: FlaskClient, tenant: Tenant) -> None:
    data = created(client, tenant, to=[A, B], client_reference="r")
    got = client.get(url(tenant, f"/{data['id']}"), headers=tenant.auth)
    assert got.status_code == 200
    assert got.get_json() == data


def test_list_pages_and_filters(client: FlaskClient, tenant: Tenant) -> None:
    ids = [
        created(client, tenant, client_reference="even" if i % 2 == 0 else "odd")["id"]
        for i in range(5)
    ]
    other_sender = created(client, tenant, **{"from": "Shop"})["id"]
    response = client.get(url(tenant, "?page_size=2"), headers=tenant.auth)
    assert response.status_code == 200
    page = response.get_json()
    assert set(page) == {"page", "page_size", "count", "batches"}
    assert (page["page"], page["page_size"], page["count"]) == (0, 2, 6)
    for batch in page["batches"]:
        assert_batch_shape(batch)
    seen = []
    for n in range(3):
        body = client.get(url(tenant, f"?page_size=2&page={n}"), headers=tenant.auth).get_json()
        assert body["page"] == n
        seen += [b["id"] for b in body["batches"]]
    assert sorted(seen) == sorted([*ids, other_sender])
    default = client.get(url(tenant), headers=tenant.auth).get_json()
    assert default["page_size"] == 6 and default["count"] == 6
    evens = client.get(url(tenant, "?client_reference=even"), headers=tenant.auth).get_json()
    assert sorted(b["id"] for b in evens["batches"]) == sorted(ids[0::2])
    shop = client.get(url(tenant, "?from=Shop,99999"), headers=tenant.auth).get_json()
    assert [b["id"] for b in shop["batches"]] == [other_sender]
    future = client.get(url(tenant, f"?start_date={iso(timedelta(hours=1))}"), headers=tenant.auth)
    assert future.get_json()["count"] == 0
    past = client.get(url(tenant, f"?end_date={iso(-timedelta(hours=1))}"), headers=tenant.auth)
    assert past.get_json()["count"] == 0
    assert_error(
        client.get(url(tenant, "?page_size=101"), headers=tenant.auth),
        400,
        "syntax_constraint_violation",
    )


# --- update ------------------------------------------------------------------------------


def test_update_before_sending(
    client: FlaskClient, tenant: Tenant, sessions: sessionmaker[Session], publisher: Any
) -> None:
    data = created(
        client,
        tenant,
        to=[A, B],
        send_at=FUTURE,
        body="Hi ${name}",
        parameters={"name": {A: "Joe", "default": "you"}},
    )
    later = iso(timedelta(days=2))
    response = client.post(
        url(tenant, f"/{data['id']}"),
        json={
            "to_add": [C],
            "to_remove": [A],
            "body": "Bye ${name}",
            "delivery_report": "full",
            "send_at": later,
            "callback_url": "http://127.0.0.1:9/new",
            "from": "Shop",
        },
        headers=tenant.auth,
    )
    assert response.status_code == 200, response.get_json()
    updated = response.get_json()
    assert_batch_shape(updated)
    assert updated["id"] == data["id"]
    assert updated["to"] == [B, C]
    assert (updated["body"], updated["from"]) == ("Bye ${name}", "Shop")
    assert updated["delivery_report"] == "full"
    assert updated["callback_url"] == "http://127.0.0.1:9/new"
    assert updated["send_at"] == later
    assert parse_time(updated["expire_at"]) == parse_time(later) + timedelta(days=3)
    assert updated["created_at"] == data["created_at"]
    assert parse_time(updated["modified_at"]) >= parse_time(data["modified_at"])
    assert [(r.seq, r.to, r.body) for r in recipients(sessions, data["id"])] == [
        (0, B, "Bye you"),
        (1, C, "Bye you"),
    ]
    assert client.get(url(tenant, f"/{data['id']}"), headers=tenant.auth).get_json() == updated


def test_update_send_at_now_queues_the_batch(
    client: FlaskClient, tenant: Tenant, publisher: Any
) -> None:
    data = created(client, tenant, send_at=FUTURE)
    assert not [m for m in publisher.messages if m.task == "dispatch_batch"]
    response = client.post(
        url(tenant, f"/{data['id']}"),
        json={"send_at": iso(-timedelta(minutes=1))},
        headers=tenant.auth,
    )
    assert response.status_code == 200
    assert abs(parse_time(response.get_json()["send_at"]) - utcnow()) < timedelta(seconds=5)
    dispatches = [m for m in publisher.messages if m.task == "dispatch_batch"]
    assert [m.kwargs["batch_id"] for m in dispatches] == [data["id"]]


def test_update_refused_once_sending_started(
    client: FlaskClient, tenant: Tenant, sessions: sessionmaker[Session], settings: Settings
) -> None:
    data = created(client, tenant, to=[A, B])
    start_sending(sessions, settings, data["id"])
    response = client.post(url(tenant, f"/{data['id']}"), json={"to_add": [C]}, headers=tenant.auth)
    assert "started sending" in assert_error(response, 400, "syntax_constraint_violation")
    assert [r.to for r in recipients(sessions, data["id"])] == [A, B]


def test_update_cannot_remove_every_recipient(client: FlaskClient, tenant: Tenant) -> None:
    data = created(client, tenant, send_at=FUTURE)
    response = client.post(
        url(tenant, f"/{data['id']}"), json={"to_remove": [A]}, headers=tenant.auth
    )
    assert_error(response, 400, "syntax_constraint_violation")


# --- replace -----------------------------------------------------------------------------


def test_replace_keeps_the_id_and_replaces_everything(
    client: FlaskClient, tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    data = created(
        client, tenant, to=[A, B], send_at=FUTURE, client_reference="old", delivery_report="full"
    )
    response = client.put(
        url(tenant, f"/{data['id']}"),
        json={"to": [C], "from": "New", "body": "Replaced"},
        headers=tenant.auth,
    )
    assert response.status_code == 200, response.get_json()
    replaced = response.get_json()
    assert_batch_shape(replaced)
    assert replaced["id"] == data["id"]
    assert (replaced["to"], replaced["from"], replaced["body"]) == ([C], "New", "Replaced")
    assert replaced["delivery_report"] == "none"
    assert "client_reference" not in replaced
    assert replaced["canceled"] is False
    assert [r.to for r in recipients(sessions, data["id"])] == [C]


def test_replace_refused_once_sending_started(
    client: FlaskClient, tenant: Tenant, sessions: sessionmaker[Session], settings: Settings
) -> None:
    data = created(client, tenant)
    start_sending(sessions, settings, data["id"])
    response = client.put(
        url(tenant, f"/{data['id']}"),
        json={"to": [C], "from": "x", "body": "y"},
        headers=tenant.auth,
    )
    assert_error(response, 400, "syntax_constraint_violation")
    assert client.get(url(tenant, f"/{data['id']}"), headers=tenant.auth).get_json()["to"] == [A]


# --- cancel ------------------------------------------------------------------------------


def test_cancel_returns_the_batch_canceled(
    client: FlaskClient, tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    data = created(client, tenant, to=[A, B], send_at=FUTURE)
    response = client.delete(url(tenant, f"/{data['id']}"), headers=tenant.auth)
    assert response.status_code == 200
    body = response.get_json()
    assert_batch_shape(body)
    assert body["canceled"] is True and body["id"] == data["id"]
    assert {r.status.value for r in recipients(sessions, data["id"])} == {"cancelled"}
    again = client.delete(url(tenant, f"/{data['id']}"), headers=tenant.auth)
    assert again.status_code == 200 and again.get_json()["canceled"] is True
    update = client.post(url(tenant, f"/{data['id']}"), json={"body": "x"}, headers=tenant.auth)
    assert_error(update, 400, "syntax_constraint_violation")


def test_cancelling_a_sent_batch_changes_nothing(
    client: FlaskClient, tenant: Tenant, sessions: sessionmaker[Session], settings: Settings
) -> None:
    data = created(client, tenant, to=[A])
    start_sending(sessions, settings, data["id"])
    mark_sent(sessions, data["id"], [A])
    receipt(sessions, data["id"], A, "delivered")
    before = client.get(url(tenant, f"/{data['id']}"), headers=tenant.auth).get_json()
    response = client.delete(url(tenant, f"/{data['id']}"), headers=tenant.auth)
    assert response.status_code == 200
    assert response.get_json() == before
    assert before["canceled"] is False
    assert [r.status.value for r in recipients(sessions, data["id"])] == ["delivered"]


def test_cancel_while_sending_stops_only_unclaimed(
    client: FlaskClient, tenant: Tenant, sessions: sessionmaker[Session], settings: Settings
) -> None:
    data = created(client, tenant, to=[A, B])
    start_sending(sessions, settings, data["id"])
    mark_sent(sessions, data["id"], [A])
    body = client.delete(url(tenant, f"/{data['id']}"), headers=tenant.auth).get_json()
    assert body["canceled"] is True
    assert [r.status.value for r in recipients(sessions, data["id"])] == ["sent", "cancelled"]
