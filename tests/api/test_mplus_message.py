"""POST /message (Messaging Plus "Add Message"): many messages per request, defaults,
shared sender IDs, per-message validation that writes nothing for any message when one
is wrong."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.test import TestResponse

from dispatcher.batches.models import Recipient, SharedSender
from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.states import BatchStatus
from tests.factories import Tenant
from tests.helpers import RecordingPublisher
from tests.helpers.mplus import EXAMPLE_ID, Ledger, load, refused, rows, stamp

REPLY_KEYS = ["to", "body", "from", "batchUuid", "messageUuid", "scheduled"]


@pytest.fixture()
def ledger(
    sessions: sessionmaker[Session], tenant: Tenant, publisher: RecordingPublisher
) -> Ledger:
    return Ledger(sessions, tenant, publisher)


def post(client: FlaskClient, tenant: Tenant, body: Any, query: str = "") -> TestResponse:
    return client.post(f"/message{query}", json=body, headers=tenant.auth)


def post_text(client: FlaskClient, tenant: Tenant, text: str) -> TestResponse:
    """Post a documented example as written, once its trailing commas are removed."""
    fixed = text.replace(",\n        }", "\n        }").replace(",\n    ]", "\n    ]")
    json.loads(fixed)  # the example itself must be JSON now
    return client.post("/message", data=fixed, content_type="application/json", headers=tenant.auth)


def custom(value: str) -> dict[str, str]:
    return {"type": "custom", "value": value}


def one(**fields: Any) -> dict[str, Any]:
    """A valid message entry."""
    return {"from": custom("sender-id"), "to": "441111111111", "body": "hello", **fields}


def ok(response: TestResponse) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.get_data(as_text=True)
    messages = response.get_json()["messages"]
    for item in messages:
        assert list(item) == REPLY_KEYS
        assert list(item["from"]) == ["type", "value"]
        assert isinstance(item["scheduled"], bool)
    return messages


def check_stored(sessions: sessionmaker[Session], item: dict[str, Any]) -> None:
    """The reply's batchUuid/messageUuid name the stored one-recipient batch."""
    batch, recipients = load(sessions, item["batchUuid"])
    assert [r.id for r in recipients] == [item["messageUuid"]]
    assert batch.sender == item["from"]["value"]
    assert batch.body == item["body"]
    assert recipients[0].to == "+" + item["to"].removeprefix("+")


# --- the documentation's examples -------------------------------------------------------


def test_documented_single_message(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    publisher: RecordingPublisher,
) -> None:
    response = client.post(
        f"/message?key={tenant.key}",
        json={
            "messages": [
                {
                    "from": {"type": "custom", "value": "sender-id"},
                    "to": "441111111111",
                    "body": "This is a test message!",
                }
            ]
        },
    )
    [item] = ok(response)
    assert item["to"] == "441111111111"
    assert item["body"] == "This is a test message!"
    assert item["from"] == {"type": "custom", "value": "sender-id"}
    assert item["scheduled"] is False
    uuid.UUID(item["batchUuid"])
    uuid.UUID(item["messageUuid"])
    check_stored(sessions, item)
    assert rows(sessions, tenant.id) == (1, 1)
    assert [m.kwargs for m in publisher.messages] == [{"batch_id": item["batchUuid"]}]


def test_documented_all_parameters(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    settings: Settings,
) -> None:
    send_at = (utcnow() + timedelta(seconds=settings.schedule_horizon * 10)).replace(microsecond=0)
    [item] = ok(
        post(
            client,
            tenant,
            {
                "messages": [
                    {
                        "from": {"type": "custom", "value": "sender-id"},
                        "to": "441111111111",
                        "body": "This is a test message!",
                        "callback": "https://my-callback.com/delivery-receipt",
                        "channels": ["sms"],
                        "id": EXAMPLE_ID,
                        "send_at": stamp(send_at),
                    }
                ]
            },
        )
    )
    assert item["scheduled"] is True
    batch, recipients = load(sessions, item["batchUuid"])
    assert batch.client_id == EXAMPLE_ID
    assert recipients[0].client_id == EXAMPLE_ID
    assert batch.callback_url == "https://my-callback.com/delivery-receipt"
    assert batch.channels == ["sms"]
    assert batch.send_at == send_at
    assert batch.status == BatchStatus.SCHEDULED
    got = client.get(f"/batch/{EXAMPLE_ID}", headers=tenant.auth)
    assert got.get_json()["identifier"] == item["batchUuid"]


def test_documented_multiple_messages_get_their_own_batches(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    publisher: RecordingPublisher,
) -> None:
    items = ok(
        post(
            client,
            tenant,
            {
                "messages": [
                    {
                        "from": {"type": "custom", "value": "sender-id-1"},
                        "to": "441111111111",
                        "body": "This is my first test message!",
                    },
                    {
                        "from": {"type": "custom", "value": "sender-id-2"},
                        "to": "442222222222",
                        "body": "This is my second test message!",
                    },
                ]
            },
        )
    )
    assert [(i["to"], i["from"]["value"]) for i in items] == [
        ("441111111111", "sender-id-1"),
        ("442222222222", "sender-id-2"),
    ]
    assert len({i["batchUuid"] for i in items}) == 2
    assert len({i["messageUuid"] for i in items}) == 2
    for item in items:
        check_stored(sessions, item)
    assert rows(sessions, tenant.id) == (2, 2)
    assert len(publisher.messages) == 2


DOCUMENTED_DEFAULTS = """{
    "defaults": {
        "from": {
            "type": "custom",
            "value": "mplus-test"
        }
    },
    "messages": [
        {
            "to": "441111111111",
            "body": "This is the first test message!",
        },
        {
            "to": "442222222222",
            "body": "This is the second test message!",
        },
        {
            "from": {
                "type": "custom",
                "value": "specific"
            },
            "to": "THIRD",
            "body": "This is the third test message!",
        },
    ]
}"""


def test_documented_defaults_example(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    # The documented example's third number, 44333333333333, has 12 national digits: no UK number is
    # that long (see the next test); a possible one stands in for it here.
    items = ok(post_text(client, tenant, DOCUMENTED_DEFAULTS.replace("THIRD", "443333333333")))
    assert [(i["to"], i["body"], i["from"], i["scheduled"]) for i in items] == [
        ("441111111111", "This is the first test message!", custom("mplus-test"), False),
        ("442222222222", "This is the second test message!", custom("mplus-test"), False),
        ("443333333333", "This is the third test message!", custom("specific"), False),
    ]
    assert len({i["batchUuid"] for i in items}) == 3
    for item in items:
        check_stored(sessions, item)


def test_documented_defaults_example_verbatim_refuses_the_impossible_number(
    client: FlaskClient, tenant: Tenant, ledger: Ledger
) -> None:
    response = post_text(client, tenant, DOCUMENTED_DEFAULTS.replace("THIRD", "44333333333333"))
    body = refused(response, 400, "messages.2.to", "44333333333333")
    assert "messages.0" not in body["message"] and "messages.1" not in body["message"]
    ledger.assert_unchanged()


def test_documented_per_message_callbacks(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    items = ok(
        post_text(
            client,
            tenant,
            """{
    "messages": [
        {
            "from": {
                "type": "custom",
                "value": "mplus-test"
            },
            "to": "441111111111",
            "body": "This is my first test message!",
            "callback": "https://my-website.com/dr?id=first_message"
        },
        {
            "from": {
                "type": "custom",
                "value": "mplus-test"
            },
            "to": "442222222222",
            "body": "This is my second test message!",
            "callback": "https://my-website.com/dr?id=second_message"
        },
    ]
}""",
        )
    )
    callbacks = [load(sessions, i["batchUuid"])[0].callback_url for i in items]
    assert callbacks == [
        "https://my-website.com/dr?id=first_message",
        "https://my-website.com/dr?id=second_message",
    ]


def test_documented_defualts_typo_is_an_unknown_field(
    client: FlaskClient, tenant: Tenant, ledger: Ledger
) -> None:
    response = post_text(
        client,
        tenant,
        """{
    "defualts": {
        "from": {
            "type": "custom",
            "value": "specific"
        },
        "callback": "https://my-website.com/delivery-receipt"
    },
    "messages": [
        {
            "to": "441111111111",
            "body": "This is my first test message!",
        },
        {
            "to": "442222222222",
            "body": "This is my second test message!",
        },
        {
            "to": "443333333333",
            "body": "This is my third test message!",
        },
    ]
}""",
    )
    refused(response, 400, "defualts")
    ledger.assert_unchanged()


def test_defaults_callback_applies_to_every_message(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    items = ok(
        post(
            client,
            tenant,
            {
                "defaults": {
                    "from": custom("specific"),
                    "callback": "https://my-website.com/delivery-receipt",
                },
                "messages": [
                    {"to": "441111111111", "body": "first"},
                    {"to": "442222222222", "body": "second"},
                    {"to": "443333333333", "body": "third"},
                ],
            },
        )
    )
    for item in items:
        batch, _ = load(sessions, item["batchUuid"])
        assert batch.callback_url == "https://my-website.com/delivery-receipt"
        assert batch.sender == "specific"


def test_documented_channels_example(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    [item] = ok(
        post(
            client,
            tenant,
            {
                "messages": [
                    {
                        "from": custom("specific"),
                        "to": "443333333333",
                        "body": "This is the third test message!",
                        "channels": ["rcs"],
                    }
                ]
            },
        )
    )
    batch, recipients = load(sessions, item["batchUuid"])
    assert batch.channels == ["rcs"]
    assert recipients[0].channel == "rcs"


def test_message_fields_win_over_defaults(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    items = ok(
        post(
            client,
            tenant,
            {
                "defaults": {
                    "from": custom("default-sender"),
                    "body": "default body",
                    "channels": ["whatsapp"],
                },
                "messages": [
                    {"to": "441111111111"},
                    {"to": "442222222222", "body": "own body", "channels": ["rcs", "sms"]},
                    {"to": "443333333333", "from": {"type": "shared"}},
                ],
            },
        )
    )
    assert [i["body"] for i in items] == ["default body", "own body", "default body"]
    assert [i["from"]["type"] for i in items] == ["custom", "custom", "shared"]
    channels = [load(sessions, i["batchUuid"])[0].channels for i in items]
    assert channels == [["whatsapp"], ["rcs", "sms"], ["whatsapp"]]


# --- shared sender IDs -----------------------------------------------------------------


def shared_to(client: FlaskClient, tenant: Tenant, to: str) -> str:
    [item] = ok(
        post(client, tenant, {"messages": [{"from": {"type": "shared"}, "to": to, "body": "b"}]})
    )
    assert item["from"]["type"] == "shared"
    return str(item["from"]["value"])


def test_shared_sender_is_sticky_per_account_and_destination(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant, settings: Settings
) -> None:
    first = shared_to(client, tenant, "441111111111")
    assert first in settings.shared_senders
    for _ in range(5):
        assert shared_to(client, tenant, "441111111111") == first
        # The same number spelled with its + is the same destination.
        assert shared_to(client, tenant, "+441111111111") == first
    with sessions() as s:
        sticky = s.get(SharedSender, (tenant.id, "+441111111111"))
        assert sticky is not None and sticky.sender == first


def test_shared_sender_is_per_account(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    other_tenant: Tenant,
    settings: Settings,
) -> None:
    mine, theirs = settings.shared_senders[0], settings.shared_senders[1]
    with transaction(sessions) as s:
        s.add(SharedSender(account_id=tenant.id, destination="+441111111111", sender=mine))
        s.add(SharedSender(account_id=other_tenant.id, destination="+441111111111", sender=theirs))
    for _ in range(3):
        assert shared_to(client, tenant, "441111111111") == mine
        assert shared_to(client, other_tenant, "441111111111") == theirs


def test_shared_sender_twice_in_one_request_is_the_same(
    client: FlaskClient, tenant: Tenant
) -> None:
    items = ok(
        post(
            client,
            tenant,
            {
                "defaults": {"from": {"type": "shared"}, "body": "b"},
                "messages": [{"to": "441111111111"}, {"to": "441111111111"}],
            },
        )
    )
    assert items[0]["from"] == items[1]["from"]
    assert items[0]["batchUuid"] != items[1]["batchUuid"]


# --- validation ------------------------------------------------------------------------

INVALID: list[tuple[str, Any, str]] = [
    ("custom without value", {"messages": [one(**{"from": {"type": "custom"}})]}, "from.value"),
    (
        "custom with empty value",
        {"messages": [one(**{"from": {"type": "custom", "value": ""}})]},
        "from.value",
    ),
    (
        "custom with blank value",
        {"messages": [one(**{"from": {"type": "custom", "value": "  "}})]},
        "from.value",
    ),
    ("bad from type", {"messages": [one(**{"from": {"type": "pool"}})]}, "from.type"),
    ("from a string", {"messages": [one(**{"from": "sender-id"})]}, "messages.0.from"),
    ("from null", {"messages": [one(**{"from": None})]}, "messages.0.from"),
    ("unknown key in from", {"messages": [one(**{"from": {"type": "shared", "x": 1}})]}, "x"),
    ("missing from", {"messages": [{"to": "441111111111", "body": "b"}]}, "messages.0.from"),
    ("missing to", {"messages": [{"from": custom("s"), "body": "b"}]}, "messages.0.to"),
    ("missing body", {"messages": [{"from": custom("s"), "to": "441111111111"}]}, "body"),
    ("number to", {"messages": [one(to=441111111111)]}, "messages.0.to"),
    ("letters to", {"messages": [one(to="44abc")]}, "messages.0.to"),
    ("unicode digits to", {"messages": [one(to="\u0664\u0664" + "\u0661" * 10)]}, "to"),
    ("empty body", {"messages": [one(body="")]}, "messages.0.body"),
    ("blank body", {"messages": [one(body="  \n")]}, "messages.0.body"),
    ("NUL body", {"messages": [one(body="a\x00")]}, "messages.0.body"),
    ("surrogate body", {"messages": [one(body="a\udfff")]}, "messages.0.body"),
    ("array body", {"messages": [one(body=["b"])]}, "messages.0.body"),
    ("unknown channel", {"messages": [one(channels=["pigeon"])]}, "messages.0.channels"),
    ("empty channels", {"messages": [one(channels=[])]}, "messages.0.channels"),
    ("string channels", {"messages": [one(channels="sms")]}, "messages.0.channels"),
    ("bad callback", {"messages": [one(callback="ftp://x.example/")]}, "messages.0.callback"),
    ("private callback", {"messages": [one(callback="http://10.1.2.3/")]}, "messages.0.callback"),
    ("bad send_at", {"messages": [one(send_at="next week")]}, "messages.0.send_at"),
    ("past send_at", {"messages": [one(send_at="2001-01-01T00:00:00Z")]}, "send_at"),
    ("bad id", {"messages": [one(id="no spaces allowed")]}, "messages.0.id"),
    ("unknown field", {"messages": [one(channel="sms")]}, "messages.0.channel"),
    ("message not an object", {"messages": ["hello"]}, "messages.0"),
    ("messages not a list", {"messages": one()}, "messages"),
    ("messages null", {"messages": None}, "messages"),
    ("missing messages", {"defaults": one()}, "messages"),
    ("zero messages", {"messages": []}, "messages"),
    ("defaults not an object", {"defaults": [], "messages": [one()]}, "defaults"),
    ("unknown envelope field", {"messages": [one()], "extra": 1}, "extra"),
    ("second message bad", {"messages": [one(), one(to="12")]}, "messages.1.to"),
    (
        "bad default reported per message",
        {"defaults": {"channels": ["pigeon"]}, "messages": [one(), one()]},
        "messages.1.channels",
    ),
    ("id in defaults", {"defaults": {"id": "x"}, "messages": [one()]}, "defaults.id"),
    ("repeated id", {"messages": [one(id="a"), one(id="b"), one(id="a")]}, "messages.2.id"),
    ("request an array", [one()], "body"),
    ("request a string", "messages", "body"),
]


@pytest.mark.parametrize(
    ("body", "name"), [(b, n) for _, b, n in INVALID], ids=[i for i, *_ in INVALID]
)
def test_invalid_request_is_refused_and_nothing_written(
    client: FlaskClient, tenant: Tenant, ledger: Ledger, body: Any, name: str
) -> None:
    refused(post(client, tenant, body), 400, name)
    ledger.assert_unchanged()


def test_errors_name_every_bad_index_and_nothing_is_written(
    client: FlaskClient, tenant: Tenant, ledger: Ledger
) -> None:
    body = {
        "defaults": {"from": custom("s"), "body": "b"},
        "messages": [
            {"to": "441111111111"},
            {"to": "x"},
            {"to": "442222222222"},
            {"to": "443333333333", "body": " "},
            {"body": "no number, and no default for it"},
        ],
    }
    response = post(client, tenant, body)
    message = refused(response, 400, "messages.1.to", "messages.3.body", "messages.4.to")["message"]
    assert "messages.0" not in message and "messages.2" not in message
    ledger.assert_unchanged()


def test_more_than_max_messages_is_refused(
    client: FlaskClient, tenant: Tenant, ledger: Ledger, settings: Settings
) -> None:
    body = {
        "defaults": {"from": custom("s"), "body": "b", "to": "441111111111"},
        "messages": [{}] * (settings.max_destinations + 1),
    }
    refused(post(client, tenant, body), 400, "messages", str(settings.max_destinations))
    ledger.assert_unchanged()


def test_a_conflict_in_a_later_message_writes_none(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    client_id = str(uuid.uuid4())
    ok(post(client, tenant, {"messages": [one(id=client_id)]}))
    before = rows(sessions, tenant.id)
    response = post(
        client, tenant, {"messages": [one(to="442222222222"), one(id=client_id, body="changed")]}
    )
    refused(response, 409, "id")
    assert rows(sessions, tenant.id) == before


def test_retry_with_the_same_ids_returns_the_same_messages(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    body = {"messages": [one(id=str(uuid.uuid4())), one(id=str(uuid.uuid4()), to="442222222222")]}
    first = ok(post(client, tenant, body))
    again = ok(post(client, tenant, body))
    assert first == again
    assert rows(sessions, tenant.id) == (2, 2)


@pytest.mark.parametrize("query", ["?dryRun=true", "?isDryrun=true"])
def test_dry_run_writes_nothing(
    client: FlaskClient, tenant: Tenant, ledger: Ledger, query: str
) -> None:
    response = post(
        client, tenant, {"messages": [one(), one(**{"from": {"type": "shared"}})]}, query
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["dryRun"] is True
    items = response.get_json()["messages"]
    assert [(i["batchUuid"], i["messageUuid"]) for i in items] == [(None, None), (None, None)]
    assert items[0]["from"] == custom("sender-id")
    ledger.assert_unchanged()


@pytest.mark.parametrize(
    ("query", "name"),
    [("?dryRun=perhaps", "dryRun"), ("?allowMulti=true", "allowMulti"), ("?x=1", "x")],
)
def test_bad_query_is_refused(
    client: FlaskClient, tenant: Tenant, ledger: Ledger, query: str, name: str
) -> None:
    refused(post(client, tenant, {"messages": [one()]}, query), 400, name)
    ledger.assert_unchanged()


def test_long_messages_are_accepted_as_multipart(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    [item] = ok(post(client, tenant, {"messages": [one(body="a" * 161)]}))
    with sessions() as s:
        recipient = s.get(Recipient, item["messageUuid"])
        assert recipient is not None and recipient.parts == 2


def test_malformed_json_is_refused(client: FlaskClient, tenant: Tenant, ledger: Ledger) -> None:
    response = client.post(
        "/message", data='{"messages": [', content_type="application/json", headers=tenant.auth
    )
    refused(response, 400, "JSON")
    ledger.assert_unchanged()


def test_client_id_of_a_message_finds_its_batch(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    client_id = f"msg-{uuid.uuid4().hex}"
    [item] = ok(post(client, tenant, {"messages": [one(id=client_id)]}))
    got = client.get(f"/batch/{client_id}/messages", headers=tenant.auth).get_json()
    assert [m["messageUuid"] for m in got["messages"]] == [item["messageUuid"]]
    assert got["messages"][0]["id"] == client_id
