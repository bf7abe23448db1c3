"""POST /batch and the batch endpoints beside it (Messaging Plus "Add Batch", "Cancel
Pending Batch"): intake, validation, idempotency, reads, pagination and cancel, with the
database checked after every refusal."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.test import TestResponse

from api.app import create_app
from dispatcher.batches import service
from dispatcher.batches.models import Recipient
from dispatcher.config import Settings
from dispatcher.db import WriteGate, transaction, utcnow
from dispatcher.runtime import Runtime
from dispatcher.states import BatchStatus, RecipientStatus
from tests.factories import Tenant
from tests.helpers import RecordingPublisher
from tests.helpers.mplus import (
    EXAMPLE_ID,
    Ledger,
    load,
    minimum,
    numbers,
    refused,
    rows,
    stamp,
)


@pytest.fixture()
def ledger(
    sessions: sessionmaker[Session], tenant: Tenant, publisher: RecordingPublisher
) -> Ledger:
    return Ledger(sessions, tenant, publisher)


@pytest.fixture()
def make_client(settings: Settings) -> Iterator[Callable[..., tuple[FlaskClient, Runtime]]]:
    """An API on a copy of the settings with some fields changed."""
    made: list[Runtime] = []

    def build(**changes: Any) -> tuple[FlaskClient, Runtime]:
        rt = Runtime(settings.replace(**changes), RecordingPublisher())
        made.append(rt)
        return create_app(rt.settings, runtime=rt).test_client(), rt

    yield build
    for rt in made:
        rt.dispose()


def post(client: FlaskClient, tenant: Tenant, body: Any, query: str = "") -> TestResponse:
    return client.post(f"/batch{query}", json=body, headers=tenant.auth)


# --- happy paths -----------------------------------------------------------------------


def test_documented_minimum_body_is_queued_and_dispatched(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    publisher: RecordingPublisher,
) -> None:
    response = client.post(
        f"/batch?key={tenant.key}",
        data='{\n "from": "mplus-test",\n "message": "mplus test message!",\n'
        ' "destinations": [\n  "441111111111"\n ]\n}',
        content_type="application/json",
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert list(body) == ["identifier"]
    batch, recipients = load(sessions, body["identifier"])
    assert str(uuid.UUID(body["identifier"])) == body["identifier"]
    assert batch.account_id == tenant.id
    assert (batch.sender, batch.body, batch.channels) == (
        "mplus-test",
        "mplus test message!",
        ["sms"],
    )
    assert batch.status == BatchStatus.QUEUED
    assert [(r.to, r.status, r.channel) for r in recipients] == [
        ("+441111111111", RecipientStatus.SCHEDULED, "sms")
    ]
    assert rows(sessions, tenant.id) == (1, 1)
    assert [(m.task, m.kwargs) for m in publisher.messages] == [
        ("dispatch_batch", {"batch_id": body["identifier"]})
    ]


def test_documented_all_parameters_with_a_near_future_send_at(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    publisher: RecordingPublisher,
    settings: Settings,
) -> None:
    send_at = (utcnow() + timedelta(seconds=settings.schedule_horizon / 2)).replace(microsecond=0)
    response = post(
        client,
        tenant,
        {
            "from": "mplus-test",
            "message": "mplus test message!",
            "destinations": ["441111111111"],
            "callback": "https://my-callback.com/delivery-receipt",
            "id": EXAMPLE_ID,
            "send_at": stamp(send_at),
            "channel": "rcs",
            "fallback_channels": ["sms"],
        },
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    identifier = response.get_json()["identifier"]
    batch, recipients = load(sessions, identifier)
    assert batch.client_id == EXAMPLE_ID
    assert batch.callback_url == "https://my-callback.com/delivery-receipt"
    assert batch.channels == ["rcs", "sms"]
    assert batch.send_at == send_at
    assert batch.status == BatchStatus.QUEUED
    assert [(r.to, r.channel, r.status) for r in recipients] == [
        ("+441111111111", "rcs", RecipientStatus.SCHEDULED)
    ]
    assert len(publisher.messages) == 1
    assert publisher.messages[0].kwargs == {"batch_id": identifier}
    assert publisher.messages[0].eta == send_at
    # The client's own id finds the batch whatever id the server chose.
    got = client.get(f"/batch/{EXAMPLE_ID}", headers=tenant.auth)
    assert got.status_code == 200 and got.get_json()["identifier"] == identifier


def test_documented_multiple_destinations(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    destinations = ["441111111111", "442222222222", "443333333333", "444444444444", "445555555555"]
    response = post(client, tenant, minimum(destinations=destinations))
    assert response.status_code == 200, response.get_data(as_text=True)
    batch, recipients = load(sessions, response.get_json()["identifier"])
    assert batch.recipient_count == 5
    assert [r.to for r in recipients] == ["+" + d for d in destinations]
    assert [r.seq for r in recipients] == [0, 1, 2, 3, 4]
    assert rows(sessions, tenant.id) == (1, 5)


def test_documented_channels_example(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    response = post(client, tenant, minimum(channel="rcs", fallback_channels=["sms"]))
    assert response.status_code == 200
    batch, _ = load(sessions, response.get_json()["identifier"])
    assert batch.channels == ["rcs", "sms"]


def test_uuid_and_at_spellings(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    publisher: RecordingPublisher,
    settings: Settings,
) -> None:
    client_id = str(uuid.uuid4())
    send_at = (utcnow() + timedelta(seconds=settings.schedule_horizon + 3600)).replace(
        microsecond=0
    )
    response = post(client, tenant, minimum(uuid=client_id, at=stamp(send_at)))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json() == {"identifier": client_id}
    batch, recipients = load(sessions, client_id)
    assert batch.client_id == client_id
    assert batch.send_at == send_at
    # Beyond the horizon: stored, not handed to the broker.
    assert batch.status == BatchStatus.SCHEDULED
    assert [r.status for r in recipients] == [RecipientStatus.SCHEDULED]
    assert publisher.messages == []


def test_same_value_under_both_spellings_is_accepted(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    client_id = str(uuid.uuid4())
    response = post(client, tenant, minimum(id=client_id, uuid=client_id))
    assert response.status_code == 200
    assert response.get_json() == {"identifier": client_id}


def test_far_future_send_at_publishes_nothing(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    publisher: RecordingPublisher,
    settings: Settings,
) -> None:
    send_at = utcnow() + timedelta(seconds=settings.schedule_horizon * 10)
    response = post(client, tenant, minimum(send_at=stamp(send_at)))
    assert response.status_code == 200
    batch, _ = load(sessions, response.get_json()["identifier"])
    assert batch.status == BatchStatus.SCHEDULED
    assert publisher.messages == []


def test_send_at_with_an_offset_is_stored_as_utc(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    at = (utcnow() + timedelta(days=2)).replace(microsecond=0)
    local = (at + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S+02:00")
    response = post(client, tenant, minimum(send_at=local))
    assert response.status_code == 200
    batch, _ = load(sessions, response.get_json()["identifier"])
    assert batch.send_at == at


def test_numbers_are_normalised_and_deduplicated(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    response = post(
        client, tenant, minimum(destinations=["+441111111111", "441111111111", "442222222222"])
    )
    assert response.status_code == 200
    _, recipients = load(sessions, response.get_json()["identifier"])
    assert [r.to for r in recipients] == ["+441111111111", "+442222222222"]


def test_exactly_max_destinations_is_accepted(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant, settings: Settings
) -> None:
    response = post(client, tenant, minimum(destinations=numbers(settings.max_destinations)))
    assert response.status_code == 200
    assert rows(sessions, tenant.id) == (1, settings.max_destinations)


def test_message_of_max_length_is_accepted_with_allow_multi(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant, settings: Settings
) -> None:
    response = post(
        client, tenant, minimum(message="a" * settings.max_body_length), "?allowMulti=true"
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    assert rows(sessions, tenant.id) == (1, 1)


# --- idempotency -----------------------------------------------------------------------


def test_same_id_and_body_is_the_same_batch(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    publisher: RecordingPublisher,
) -> None:
    client_id = str(uuid.uuid4())
    first = post(client, tenant, minimum(id=client_id))
    # The retry spells the id the other way: still the same request.
    second = post(client, tenant, minimum(uuid=client_id))
    assert first.status_code == second.status_code == 200
    assert first.get_json() == second.get_json() == {"identifier": client_id}
    assert rows(sessions, tenant.id) == (1, 1)
    assert len(publisher.messages) == 1


def test_same_id_with_a_different_body_conflicts(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant, ledger: Ledger
) -> None:
    client_id = str(uuid.uuid4())
    assert post(client, tenant, minimum(id=client_id)).status_code == 200
    ledger.before = ledger.snapshot()
    body = refused(post(client, tenant, minimum(id=client_id, message="other")), 409, "id")
    assert body["code"] == 1409
    ledger.assert_unchanged()
    batch, _ = load(sessions, client_id)
    assert batch.body == "mplus test message!"


@pytest.mark.parametrize("field", ["id", "uuid"])
def test_an_id_that_is_not_a_uuid_is_refused_naming_the_field(
    client: FlaskClient, tenant: Tenant, ledger: Ledger, field: str
) -> None:
    # ``uuid`` is folded into its canonical spelling ``id`` before validation.
    body = refused(post(client, tenant, minimum(**{field: "not-a-uuid"})), 400, "id")
    assert "UUID" in body["message"]
    ledger.assert_unchanged()


def test_a_callback_with_a_lone_surrogate_is_refused(
    client: FlaskClient, tenant: Tenant, ledger: Ledger
) -> None:
    raw = b'{"from": "Shop", "message": "Hi", "destinations": ["447700900001"], '
    raw += b'"callback": "https://example.com/\\ud800"}'
    response = client.post(
        "/batch", data=raw, headers={**tenant.auth, "Content-Type": "application/json"}
    )
    refused(response, 400, "callback")
    ledger.assert_unchanged()


def test_client_uuid_works_in_get_and_delete(client: FlaskClient, tenant: Tenant) -> None:
    client_id = str(uuid.uuid4())
    assert post(client, tenant, minimum(id=client_id)).status_code == 200
    got = client.get(f"/batch/{client_id}", headers=tenant.auth)
    assert got.status_code == 200
    assert got.get_json()["identifier"] == client_id
    deleted = client.delete(f"/batch/{client_id}", headers=tenant.auth)
    assert deleted.status_code == 200
    assert deleted.get_json() == {"identifier": client_id, "cancelledCount": 1}


def test_same_client_id_in_two_tenants_are_two_batches(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    other_tenant: Tenant,
) -> None:
    client_id = str(uuid.uuid4())
    mine = post(client, tenant, minimum(id=client_id)).get_json()["identifier"]
    theirs = post(client, other_tenant, minimum(id=client_id, message="x"))
    assert theirs.status_code == 200
    assert theirs.get_json()["identifier"] != mine
    assert rows(sessions, tenant.id) == rows(sessions, other_tenant.id) == (1, 1)
    got = client.get(f"/batch/{client_id}", headers=other_tenant.auth)
    assert got.get_json()["identifier"] == theirs.get_json()["identifier"]
    assert got.get_json()["message"] == "x"


# --- validation ------------------------------------------------------------------------

INVALID_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("missing from", {"message": "m", "destinations": ["441111111111"]}, "from"),
    ("missing message", {"from": "a", "destinations": ["441111111111"]}, "message"),
    ("missing destinations", {"from": "a", "message": "m"}, "destinations"),
    ("number from", minimum(**{"from": 12}), "from"),
    ("null from", minimum(**{"from": None}), "from"),
    ("object from", minimum(**{"from": {"type": "custom"}}), "from"),
    ("array from", minimum(**{"from": ["a"]}), "from"),
    ("empty from", minimum(**{"from": ""}), "from"),
    ("blank from", minimum(**{"from": "   "}), "from"),
    ("long from", minimum(**{"from": "a" * 65}), "from"),
    ("number message", minimum(message=5), "message"),
    ("null message", minimum(message=None), "message"),
    ("object message", minimum(message={"text": "m"}), "message"),
    ("array message", minimum(message=["m"]), "message"),
    ("bool message", minimum(message=True), "message"),
    ("empty message", minimum(message=""), "message"),
    ("whitespace message", minimum(message=" \n\t "), "message"),
    ("NUL in message", minimum(message="a\x00b"), "message"),
    ("lone surrogate in message", minimum(message="a\ud800b"), "message"),
    ("NUL in from", minimum(**{"from": "a\x00"}), "from"),
    ("string destinations", minimum(destinations="441111111111"), "destinations"),
    ("null destinations", minimum(destinations=None), "destinations"),
    ("object destinations", minimum(destinations={"to": "441111111111"}), "destinations"),
    ("number destination", minimum(destinations=[441111111111]), "destinations"),
    ("null destination", minimum(destinations=[None]), "destinations"),
    ("array destination", minimum(destinations=[["441111111111"]]), "destinations"),
    ("empty destinations", minimum(destinations=[]), "destinations"),
    ("letters", minimum(destinations=["44abc1111111"]), "destinations"),
    ("too short", minimum(destinations=["12"]), "destinations"),
    ("too long", minimum(destinations=["4411111111111111111111"]), "destinations"),
    ("plus alone", minimum(destinations=["+"]), "destinations"),
    ("empty number", minimum(destinations=[""]), "destinations"),
    ("spaces in number", minimum(destinations=["+44 1111 111111"]), "destinations"),
    ("arabic-indic digits", minimum(destinations=["\u0664\u0664" + "\u0661" * 10]), "destinations"),
    ("fullwidth digits", minimum(destinations=["\uff14\uff14" + "\uff11" * 10]), "destinations"),
    ("superscript digits", minimum(destinations=["44111111111\u00b2"]), "destinations"),
    ("second number bad", minimum(destinations=["441111111111", "x"]), "destinations.1"),
    ("unknown channel", minimum(channel="pigeon"), "channel"),
    ("number channel", minimum(channel=1), "channel"),
    ("unknown fallback", minimum(fallback_channels=["pigeon"]), "fallback_channels"),
    ("string fallback", minimum(fallback_channels="sms"), "fallback_channels"),
    ("null fallback", minimum(fallback_channels=None), "fallback_channels"),
    ("send_at not ISO", minimum(send_at="tomorrow at nine"), "send_at"),
    ("send_at a number", minimum(send_at=1767258000), "send_at"),
    ("send_at bad month", minimum(send_at="2026-13-01T09:00:00Z"), "send_at"),
    ("send_at year 9999", minimum(send_at="9999-12-31T23:59:59Z"), "send_at"),
    ("send_at overflows", minimum(send_at="9999-12-31T23:59:59-01:00"), "send_at"),
    ("send_at underflows", minimum(send_at="0001-01-01T00:00:00+01:00"), "send_at"),
    ("at not ISO", minimum(at="soon"), "at"),
    ("id and uuid differ", minimum(id=str(uuid.uuid4()), uuid=str(uuid.uuid4())), "uuid"),
    ("send_at and at differ", minimum(send_at="2030-01-01T00:00:00Z", at="2031-01-01"), "at"),
    ("number id", minimum(id=12345), "id"),
    ("id with spaces", minimum(id="a b"), "id"),
    ("id too long", minimum(id="a" * 101), "id"),
    ("ftp callback", minimum(callback="ftp://example.com/dr"), "callback"),
    ("javascript callback", minimum(callback="javascript:alert(1)"), "callback"),
    ("no scheme callback", minimum(callback="example.com/dr"), "callback"),
    ("number callback", minimum(callback=5), "callback"),
    ("private callback", minimum(callback="http://10.0.0.1/dr"), "callback"),
    ("metadata callback", minimum(callback="http://169.254.169.254/latest"), "callback"),
    ("ipv6 loopback callback", minimum(callback="http://[::1]:8080/dr"), "callback"),
    ("credentials callback", minimum(callback="https://u:p@example.com/dr"), "callback"),
    ("huge callback", minimum(callback="https://example.com/" + "a" * 2100), "callback"),
    ("unknown field", minimum(priority="high"), "priority"),
    ("snake-case typo", minimum(fallback_channel=["sms"]), "fallback_channel"),
]


@pytest.mark.parametrize(
    ("body", "name"), [(b, n) for _, b, n in INVALID_BODIES], ids=[i for i, _, _ in INVALID_BODIES]
)
def test_invalid_body_is_refused_and_nothing_written(
    client: FlaskClient, tenant: Tenant, ledger: Ledger, body: dict[str, Any], name: str
) -> None:
    body = refused(post(client, tenant, body), 400, name)
    assert body["code"] in (1000, 1002)
    ledger.assert_unchanged()


def test_more_than_max_destinations(
    client: FlaskClient, tenant: Tenant, ledger: Ledger, settings: Settings
) -> None:
    body = minimum(destinations=numbers(settings.max_destinations + 1))
    refused(post(client, tenant, body), 400, "destinations", str(settings.max_destinations))
    ledger.assert_unchanged()


def test_message_longer_than_max_body_length(
    client: FlaskClient, tenant: Tenant, ledger: Ledger, settings: Settings
) -> None:
    body = minimum(message="a" * (settings.max_body_length + 1))
    refused(post(client, tenant, body, "?allowMulti=true"), 400, "message")
    ledger.assert_unchanged()


def test_send_at_inside_the_minimum_lead_is_refused(
    make_client: Callable[..., tuple[FlaskClient, Runtime]],
    sessions: sessionmaker[Session],
    tenant: Tenant,
) -> None:
    client, rt = make_client(min_send_at_lead=300)
    publisher = rt.publisher
    assert isinstance(publisher, RecordingPublisher)
    before = rows(sessions, tenant.id)
    for when in (utcnow() - timedelta(hours=1), utcnow() + timedelta(seconds=60)):
        refused(post(client, tenant, minimum(send_at=stamp(when))), 400, "send_at", "300")
        refused(post(client, tenant, minimum(at=stamp(when))), 400, "send_at")
    assert rows(sessions, tenant.id) == before
    ok = post(client, tenant, minimum(send_at=stamp(utcnow() + timedelta(seconds=600))))
    assert ok.status_code == 200
    assert rows(sessions, tenant.id) == (before[0] + 1, before[1] + 1)
    assert publisher.messages == []  # 600 s is beyond the 60 s horizon of the test settings


def test_past_send_at_is_refused_even_without_a_lead(
    client: FlaskClient, tenant: Tenant, ledger: Ledger
) -> None:
    refused(post(client, tenant, minimum(send_at="2020-01-01T00:00:00Z")), 400, "send_at")
    ledger.assert_unchanged()


@pytest.mark.parametrize(
    "callback",
    ["http://localhost:8080/dr", "http://127.0.0.1/dr", "http://127.1/dr", "http://[::1]/dr"],
)
def test_loopback_callback_is_refused_unless_allow_listed(
    make_client: Callable[..., tuple[FlaskClient, Runtime]],
    sessions: sessionmaker[Session],
    tenant: Tenant,
    callback: str,
) -> None:
    strict, _ = make_client(callback_allowlist=())
    before = rows(sessions, tenant.id)
    refused(post(strict, tenant, minimum(callback=callback)), 400, "callback")
    assert rows(sessions, tenant.id) == before


def test_allow_listed_callback_is_accepted(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    # The test settings allow-list 127.0.0.1.
    response = post(client, tenant, minimum(callback="http://127.0.0.1:9/dr"))
    assert response.status_code == 200
    batch, _ = load(sessions, response.get_json()["identifier"])
    assert batch.callback_url == "http://127.0.0.1:9/dr"


@pytest.mark.parametrize(
    "data",
    [
        '{"from": "a", "message": ',
        "",
        "null",
        "not json at all",
        '{"from": "a",}',
        "[" * 100_000 + "]" * 100_000,
        b"\xff\xfe{}",
    ],
    ids=["truncated", "empty", "null", "text", "trailing-comma", "deeply-nested", "bad-utf8"],
)
def test_malformed_json_is_refused(
    client: FlaskClient, tenant: Tenant, ledger: Ledger, data: str | bytes
) -> None:
    response = client.post(
        "/batch", data=data, content_type="application/json", headers=tenant.auth
    )
    refused(response, 400)
    ledger.assert_unchanged()


@pytest.mark.parametrize(
    "body",
    [[minimum()], "a string", 42, True],
    ids=["array", "string", "number", "bool"],
)
def test_json_that_is_not_an_object_is_refused(
    client: FlaskClient, tenant: Tenant, ledger: Ledger, body: Any
) -> None:
    refused(post(client, tenant, body), 400)
    ledger.assert_unchanged()


def test_oversized_body_is_413(
    client: FlaskClient, tenant: Tenant, ledger: Ledger, settings: Settings
) -> None:
    data = json.dumps(minimum(message="a" * settings.max_request_bytes))
    assert len(data) > settings.max_request_bytes
    response = client.post(
        "/batch", data=data, content_type="application/json", headers=tenant.auth
    )
    body = refused(response, 413)
    assert body["code"] == 1413
    ledger.assert_unchanged()


def test_allow_multi_false_refuses_a_two_part_message(
    client: FlaskClient, tenant: Tenant, ledger: Ledger
) -> None:
    long = "a" * 161
    refused(post(client, tenant, minimum(message=long)), 400, "message", "part", "allowMulti=true")
    refused(post(client, tenant, minimum(message=long), "?allowMulti=false"), 400, "message")
    ledger.assert_unchanged()


def test_allow_multi_true_accepts_a_two_part_message(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    response = post(client, tenant, minimum(message="a" * 161), "?allowMulti=true")
    assert response.status_code == 200
    _, recipients = load(sessions, response.get_json()["identifier"])
    assert [r.parts for r in recipients] == [2]


def test_part_limit_only_applies_to_sms(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    response = post(client, tenant, minimum(message="a" * 161, channel="rcs"))
    assert response.status_code == 200
    assert rows(sessions, tenant.id) == (1, 1)


@pytest.mark.parametrize("query", ["?dryRun=true", "?isDryrun=true", "?isDryRun=1"])
def test_dry_run_writes_nothing(
    client: FlaskClient, tenant: Tenant, ledger: Ledger, query: str
) -> None:
    response = post(client, tenant, minimum(destinations=["441111111111", "442222222222"]), query)
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["dryRun"] is True
    assert body["recipients"] == 2
    assert body["parts"] == 2
    assert body["encoding"] == "GSM7" or body["encoding"].lower().startswith("gsm")
    ledger.assert_unchanged()


def test_dry_run_still_validates(client: FlaskClient, tenant: Tenant, ledger: Ledger) -> None:
    refused(post(client, tenant, minimum(destinations=["x"]), "?dryRun=true"), 400, "destinations")
    refused(post(client, tenant, minimum(message="a" * 161), "?dryRun=true"), 400, "message")
    ledger.assert_unchanged()


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("?dryRun=maybe", "dryRun"),
        ("?allowMulti=2", "allowMulti"),
        ("?isDryrun=", "dryRun"),
        ("?dryRun=true&isDryrun=false", "isDryrun"),
        ("?dry_run=true", "dry_run"),
        ("?foo=bar", "foo"),
    ],
)
def test_bad_query_is_refused(
    client: FlaskClient, tenant: Tenant, ledger: Ledger, query: str, name: str
) -> None:
    refused(post(client, tenant, minimum(), query), 400, name)
    ledger.assert_unchanged()


# --- reads -----------------------------------------------------------------------------


def test_get_batch_counts_per_state(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    created = post(client, tenant, minimum(destinations=numbers(3))).get_json()["identifier"]
    with transaction(sessions) as s:
        first = s.scalar(select(Recipient).where(Recipient.batch_id == created, Recipient.seq == 0))
        assert first is not None
        first.status = RecipientStatus.DELIVERED
    response = client.get(f"/batch/{created}", headers=tenant.auth)
    assert response.status_code == 200
    body = response.get_json()
    assert body["identifier"] == created
    assert body["status"] == "queued"
    assert body["recipients"] == 3
    assert body["from"] == "mplus-test"
    assert body["channels"] == ["sms"]
    assert set(body["counts"]) == {s.value for s in RecipientStatus}
    assert body["counts"]["scheduled"] == 2
    assert body["counts"]["delivered"] == 1
    assert sum(body["counts"].values()) == 3


def test_list_messages_pages_in_batch_order(client: FlaskClient, tenant: Tenant) -> None:
    destinations = numbers(5)
    created = post(client, tenant, minimum(destinations=destinations)).get_json()["identifier"]
    seen: list[str] = []
    for page in range(3):
        response = client.get(
            f"/batch/{created}/messages?page={page}&pageSize=2", headers=tenant.auth
        )
        assert response.status_code == 200
        body = response.get_json()
        assert (body["batchUuid"], body["page"], body["pageSize"], body["total"]) == (
            created,
            page,
            2,
            5,
        )
        assert len(body["messages"]) == (2 if page < 2 else 1)
        seen.extend(m["to"] for m in body["messages"])
        for m in body["messages"]:
            uuid.UUID(m["messageUuid"])
            assert m["status"] == "scheduled"
    assert seen == ["+" + d for d in destinations]
    beyond = client.get(f"/batch/{created}/messages?page=9&pageSize=2", headers=tenant.auth)
    assert beyond.get_json()["messages"] == [] and beyond.get_json()["total"] == 5


def test_list_messages_defaults_and_status_filter(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    created = post(client, tenant, minimum(destinations=numbers(3))).get_json()["identifier"]
    with transaction(sessions) as s:
        last = s.scalar(select(Recipient).where(Recipient.batch_id == created, Recipient.seq == 2))
        assert last is not None
        last.status = RecipientStatus.FAILED
    body = client.get(f"/batch/{created}/messages", headers=tenant.auth).get_json()
    assert (body["page"], body["pageSize"], body["total"]) == (0, 100, 3)
    failed = client.get(f"/batch/{created}/messages?status=failed", headers=tenant.auth)
    assert failed.get_json()["total"] == 1
    assert [m["to"] for m in failed.get_json()["messages"]] == ["+" + numbers(3)[2]]
    assert failed.get_json()["messages"][0]["status"] == "failed"
    none = client.get(f"/batch/{created}/messages?status=delivered", headers=tenant.auth)
    assert none.get_json()["total"] == 0 and none.get_json()["messages"] == []


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("page=-1", "page"),
        ("page=abc", "page"),
        ("page=1.5", "page"),
        ("page=99999999999999999999999", "page"),
        ("pageSize=0", "pageSize"),
        ("pageSize=1001", "pageSize"),
        ("pageSize=", "pageSize"),
        ("status=bogus", "status"),
        ("sort=to", "sort"),
    ],
)
def test_bad_page_params_are_refused(
    client: FlaskClient, tenant: Tenant, query: str, name: str
) -> None:
    created = post(client, tenant, minimum()).get_json()["identifier"]
    refused(client.get(f"/batch/{created}/messages?{query}", headers=tenant.auth), 400, name)


def test_unknown_batch_is_404(client: FlaskClient, tenant: Tenant) -> None:
    for path in (f"/batch/{uuid.uuid4()}", f"/batch/{uuid.uuid4()}/messages", "/batch/%00"):
        refused(client.get(path, headers=tenant.auth), 404)
    refused(client.get("/batch/" + "a" * 500, headers=tenant.auth), 404)


def test_get_refuses_unknown_query(client: FlaskClient, tenant: Tenant) -> None:
    created = post(client, tenant, minimum()).get_json()["identifier"]
    refused(client.get(f"/batch/{created}?page=1", headers=tenant.auth), 400, "page")


# --- cancel ----------------------------------------------------------------------------


def test_delete_cancels_and_a_second_delete_conflicts(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant, settings: Settings
) -> None:
    later = stamp(utcnow() + timedelta(seconds=settings.schedule_horizon * 10))
    created = post(client, tenant, minimum(destinations=numbers(4), send_at=later)).get_json()[
        "identifier"
    ]
    response = client.delete(f"/batch/{created}", headers=tenant.auth)
    assert response.status_code == 200
    assert response.get_json() == {"identifier": created, "cancelledCount": 4}
    batch, recipients = load(sessions, created)
    assert batch.status == BatchStatus.CANCELLED
    assert {r.status for r in recipients} == {RecipientStatus.CANCELLED}
    again = refused(client.delete(f"/batch/{created}", headers=tenant.auth), 409, "cancelled")
    assert again["code"] == 1409
    counts = client.get(f"/batch/{created}", headers=tenant.auth).get_json()["counts"]
    assert counts["cancelled"] == 4


def test_delete_counts_only_unclaimed_recipients(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    created = post(client, tenant, minimum(destinations=numbers(3))).get_json()["identifier"]
    with transaction(sessions) as s:
        first = s.scalar(select(Recipient).where(Recipient.batch_id == created, Recipient.seq == 0))
        assert first is not None
        first.status = RecipientStatus.SENT
    response = client.delete(f"/batch/{created}", headers=tenant.auth)
    assert response.get_json() == {"identifier": created, "cancelledCount": 2}
    _, recipients = load(sessions, created)
    assert [r.status for r in recipients] == [
        RecipientStatus.SENT,
        RecipientStatus.CANCELLED,
        RecipientStatus.CANCELLED,
    ]


def test_delete_another_tenants_batch_is_404_and_changes_nothing(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant, other_tenant: Tenant
) -> None:
    created = post(client, tenant, minimum()).get_json()["identifier"]
    refused(client.delete(f"/batch/{created}", headers=other_tenant.auth), 404)
    batch, recipients = load(sessions, created)
    assert batch.status == BatchStatus.QUEUED
    assert [r.status for r in recipients] == [RecipientStatus.SCHEDULED]


def test_delete_unknown_batch_is_404(client: FlaskClient, tenant: Tenant) -> None:
    body = refused(client.delete(f"/batch/{uuid.uuid4()}", headers=tenant.auth), 404)
    assert body["code"] == 1404


# --- anything else ---------------------------------------------------------------------


def test_unknown_route_and_wrong_method_use_the_error_shape(
    client: FlaskClient, tenant: Tenant
) -> None:
    refused(client.get("/nope", headers=tenant.auth), 404)
    refused(client.put("/batch", json=minimum(), headers=tenant.auth), 405)
    refused(client.get("/batch", headers=tenant.auth), 405)


def test_a_duplicate_id_racing_past_the_check_is_409_not_500(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client_id = str(uuid.uuid4())
    assert post(client, tenant, minimum(id=client_id)).status_code == 200
    # As if a concurrent request committed the same id after this one looked for it.
    monkeypatch.setattr(service, "_existing", lambda *_args: None)
    refused(post(client, tenant, minimum(id=client_id)), 409, "retry")
    assert rows(sessions, tenant.id) == (1, 1)


def test_intake_writes_ahead_of_workers_at_the_sqlite_write_gate(
    client: FlaskClient, tenant: Tenant, settings: Settings
) -> None:
    # The API's writes pass SQLite's write gate as its priority writer (dispatcher/db.py,
    # WriteGate); reads take no turn. PostgreSQL has no gate.
    turns = 1 if settings.database_url.startswith("sqlite") else 0
    before = WriteGate.stats()["api"]["turns"]
    response = client.post(f"/batch?key={tenant.key}", json=minimum())
    assert response.status_code == 200, response.get_data(as_text=True)
    assert WriteGate.stats()["api"]["turns"] == before + turns
    reply = client.get(f"/batch/{response.get_json()['identifier']}?key={tenant.key}")
    assert reply.status_code == 200
    assert WriteGate.stats()["api"]["turns"] == before + turns
