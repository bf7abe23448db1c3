"""GET /callbacks, POST /callbacks/{id}/retry, the endpoint listing and re-enabling,
and the ``dispatcher callbacks`` commands: tenant isolation, validation, replay rules."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.test import TestResponse

from dispatcher import outbox
from dispatcher.cli import main
from dispatcher.config import Settings
from dispatcher.db import new_id, transaction, utcnow
from dispatcher.webhooks.models import Callback, Endpoint
from tests.factories import Tenant
from tests.helpers import RecordingPublisher

URL = "http://127.0.0.1:9/hooks"
# No callback has this id (fixed: xdist needs the same test ids in every process).
UNKNOWN_ID = "5f0c2a8e-6d1b-4c3e-9a7f-0b2d4e6f8a10"
ERROR_KEYS = {"code", "message", "errorId", "timestamp"}
CALLBACK_KEYS = {
    "id",
    "eventType",
    "state",
    "url",
    "batchUuid",
    "messageUuid",
    "attempts",
    "nextAttemptAt",
    "lastStatus",
    "lastError",
    "createdAt",
    "deliveredAt",
    "payload",
}


# --- factories and helpers -------------------------------------------------------------


def make_callback(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    *,
    state: str = "dead",
    url: str = URL,
    created_at: datetime | None = None,
) -> str:
    """A callback row as the delivery service leaves it in ``state``."""
    now = utcnow()
    failed = state in {"dead", "held"}
    row = Callback(
        id=new_id(),
        account_id=tenant.id,
        batch_id=new_id(),
        recipient_id=new_id(),
        event_type="message.delivered",
        url=url,
        payload={"type": "message.delivered", "status": "delivered"},
        state=state,
        attempts=4 if failed else 1,
        next_attempt_at=now - timedelta(minutes=5),
        enqueued_at=None,
        last_status=500 if failed else 200,
        last_error="HTTP 500" if failed else None,
        created_at=created_at or now,
        delivered_at=now if state == "delivered" else None,
    )
    with transaction(sessions) as session:
        session.add(row)
    return row.id


def make_endpoint(
    sessions: sessionmaker[Session], tenant: Tenant, url: str = URL, *, disabled: bool = True
) -> None:
    now = utcnow()
    with transaction(sessions) as session:
        session.add(
            Endpoint(
                account_id=tenant.id,
                url=url,
                failing_since=now - timedelta(days=1),
                disabled_at=now if disabled else None,
            )
        )


def load(sessions: sessionmaker[Session], callback_id: str) -> Callback:
    with sessions() as session:
        row = session.get(Callback, callback_id)
        assert row is not None
        return row


def endpoint(sessions: sessionmaker[Session], tenant: Tenant, url: str = URL) -> Endpoint:
    with sessions() as session:
        row = session.get(Endpoint, (tenant.id, url))
        assert row is not None
        return row


def published_ids(publisher: RecordingPublisher) -> list[str]:
    return [
        cid
        for m in publisher.messages
        if isinstance(m, outbox.Message) and m.task == "deliver_callbacks"
        for cid in m.kwargs["callback_ids"]
    ]


def refused(response: TestResponse, status: int, *names: str) -> dict[str, Any]:
    """Assert the native error shape and status, and that the message names ``names``."""
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert isinstance(body, dict) and set(body) == ERROR_KEYS, body
    uuid.UUID(body["errorId"])
    for name in names:
        assert name in body["message"], (name, body["message"])
    return body


# --- GET /callbacks --------------------------------------------------------------------


def test_list_shows_only_the_accounts_callbacks_newest_first(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant, other_tenant: Tenant
) -> None:
    now = utcnow()
    mine = [
        make_callback(sessions, tenant, created_at=now - timedelta(seconds=s)) for s in (3, 2, 1)
    ]
    theirs = make_callback(sessions, other_tenant, created_at=now)

    reply = client.get("/callbacks", headers=tenant.auth)

    assert reply.status_code == 200, reply.get_json()
    body = reply.get_json()
    assert (body["page"], body["pageSize"], body["total"]) == (0, 100, 3)
    assert [c["id"] for c in body["callbacks"]] == list(reversed(mine))
    assert theirs not in {c["id"] for c in body["callbacks"]}
    first = body["callbacks"][0]
    assert set(first) == CALLBACK_KEYS
    assert first["state"] == "dead" and first["attempts"] == 4 and first["lastStatus"] == 500
    assert first["payload"] == {"type": "message.delivered", "status": "delivered"}
    assert first["createdAt"].endswith("Z")


def test_list_filters_by_state_and_pages_from_zero(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    now = utcnow()
    dead = [
        make_callback(sessions, tenant, created_at=now - timedelta(seconds=s)) for s in (5, 4, 3)
    ]
    make_callback(sessions, tenant, state="delivered", created_at=now)
    make_callback(sessions, tenant, state="pending", created_at=now)

    pages = [
        client.get(f"/callbacks?state=dead&page={p}&pageSize=2", headers=tenant.auth).get_json()
        for p in (0, 1, 2)
    ]

    assert [p["total"] for p in pages] == [3, 3, 3]
    assert [len(p["callbacks"]) for p in pages] == [2, 1, 0]
    assert [c["id"] for p in pages for c in p["callbacks"]] == list(reversed(dead))
    assert all(c["state"] == "dead" for p in pages for c in p["callbacks"])
    delivered = client.get("/callbacks?state=delivered", headers=tenant.auth).get_json()
    assert [c["state"] for c in delivered["callbacks"]] == ["delivered"]


def test_list_accepts_the_key_in_the_query(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    cid = make_callback(sessions, tenant)
    reply = client.get(f"/callbacks?key={tenant.key}&state=dead")
    assert reply.status_code == 200
    assert [c["id"] for c in reply.get_json()["callbacks"]] == [cid]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("state=bogus", "state"),
        ("state=", "state"),
        ("page=-1", "page"),
        ("page=abc", "page"),
        ("pageSize=0", "pageSize"),
        ("pageSize=501", "pageSize"),
        ("limit=5", "limit"),
    ],
)
def test_list_refuses_a_bad_query(
    client: FlaskClient, tenant: Tenant, query: str, field: str
) -> None:
    refused(client.get(f"/callbacks?{query}", headers=tenant.auth), 400, field)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/callbacks"),
        ("post", f"/callbacks/{UNKNOWN_ID}/retry"),
        ("get", "/callbacks/endpoints"),
        ("post", "/callbacks/endpoints/enable"),
    ],
)
def test_every_callbacks_endpoint_needs_an_api_key(
    client: FlaskClient, method: str, path: str
) -> None:
    refused(getattr(client, method)(path), 401)
    refused(getattr(client, method)(path, headers={"Authorization": "Bearer nope"}), 401)


def test_callbacks_of_a_cancelled_batch_are_listed(
    client: FlaskClient, tenant: Tenant, publisher: RecordingPublisher
) -> None:
    """Real rows from the event machinery, not the factory: a cancel writes one per recipient."""
    send_at = (utcnow() + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    created = client.post(
        "/batch",
        json={
            "from": "Dispatcher",
            "message": "hello",
            "destinations": ["+447700900001", "+447700900002"],
            "callback": URL,
            "send_at": send_at,
        },
        headers=tenant.auth,
    )
    assert created.status_code == 200, created.get_json()
    batch_id = created.get_json()["identifier"]
    assert client.delete(f"/batch/{batch_id}", headers=tenant.auth).status_code == 200

    body = client.get("/callbacks?state=pending", headers=tenant.auth).get_json()

    assert body["total"] == 2
    assert {c["eventType"] for c in body["callbacks"]} == {"message.cancelled"}
    assert {c["batchUuid"] for c in body["callbacks"]} == {batch_id}
    assert {c["payload"]["to"] for c in body["callbacks"]} == {"+447700900001", "+447700900002"}
    assert sorted(published_ids(publisher)) == sorted(c["id"] for c in body["callbacks"])


# --- POST /callbacks/{id}/retry --------------------------------------------------------


@pytest.mark.parametrize("state", ["dead", "held"])
def test_retry_replays_a_dead_or_held_callback_now(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    publisher: RecordingPublisher,
    state: str,
) -> None:
    cid = make_callback(sessions, tenant, state=state)
    before = utcnow()

    reply = client.post(f"/callbacks/{cid}/retry", headers=tenant.auth)

    assert reply.status_code == 200, reply.get_json()
    assert reply.get_json()["id"] == cid and reply.get_json()["state"] == "pending"
    row = load(sessions, cid)
    assert row.state == "pending"
    assert row.next_attempt_at >= before - timedelta(seconds=1)
    assert row.attempts == 4  # the spent schedule is kept: the replay is one attempt
    assert published_ids(publisher) == [cid]


def test_retry_of_another_accounts_callback_is_404_and_changes_nothing(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    other_tenant: Tenant,
    publisher: RecordingPublisher,
) -> None:
    theirs = make_callback(sessions, other_tenant)
    refused(client.post(f"/callbacks/{theirs}/retry", headers=tenant.auth), 404)
    assert load(sessions, theirs).state == "dead"
    assert publisher.messages == []


@pytest.mark.parametrize("callback_id", [UNKNOWN_ID, "not-a-uuid"])
def test_retry_of_an_unknown_callback_is_404(
    client: FlaskClient, tenant: Tenant, callback_id: str
) -> None:
    refused(client.post(f"/callbacks/{callback_id}/retry", headers=tenant.auth), 404)


@pytest.mark.parametrize("state", ["delivered", "pending", "delivering"])
def test_retry_of_a_live_or_delivered_callback_is_409(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    publisher: RecordingPublisher,
    state: str,
) -> None:
    cid = make_callback(sessions, tenant, state=state)
    refused(client.post(f"/callbacks/{cid}/retry", headers=tenant.auth), 409, state)
    assert load(sessions, cid).state == state
    assert publisher.messages == []


def test_retry_refuses_unknown_query_params(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    cid = make_callback(sessions, tenant)
    refused(client.post(f"/callbacks/{cid}/retry?force=1", headers=tenant.auth), 400, "force")
    assert load(sessions, cid).state == "dead"


# --- endpoints -------------------------------------------------------------------------


def test_endpoints_lists_the_accounts_urls_with_their_health(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant, other_tenant: Tenant
) -> None:
    make_endpoint(sessions, tenant, URL)
    make_endpoint(sessions, tenant, "http://127.0.0.1:9/b", disabled=False)
    make_endpoint(sessions, other_tenant, "http://127.0.0.1:9/theirs")

    reply = client.get("/callbacks/endpoints", headers=tenant.auth)

    assert reply.status_code == 200
    endpoints = reply.get_json()["endpoints"]
    assert [(e["url"], e["enabled"]) for e in endpoints] == [
        ("http://127.0.0.1:9/b", True),
        (URL, False),
    ]
    assert endpoints[1]["disabledAt"] and endpoints[1]["failingSince"]
    assert endpoints[0]["disabledAt"] is None


def test_enable_releases_the_held_callbacks_only(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    publisher: RecordingPublisher,
) -> None:
    make_endpoint(sessions, tenant)
    held = sorted(make_callback(sessions, tenant, state="held") for _ in range(2))
    dead = make_callback(sessions, tenant, state="dead")
    elsewhere = make_callback(sessions, tenant, state="held", url="http://127.0.0.1:9/other")

    reply = client.post("/callbacks/endpoints/enable", json={"url": URL}, headers=tenant.auth)

    assert reply.status_code == 200, reply.get_json()
    assert reply.get_json() == {
        "url": URL,
        "enabled": True,
        "failingSince": None,
        "disabledAt": None,
        "released": 2,
    }
    row = endpoint(sessions, tenant)
    assert row.disabled_at is None and row.failing_since is None
    assert [load(sessions, c).state for c in held] == ["pending", "pending"]
    assert load(sessions, dead).state == "dead"
    assert load(sessions, elsewhere).state == "held"
    assert sorted(published_ids(publisher)) == held


def test_enable_of_another_accounts_endpoint_is_404(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant, other_tenant: Tenant
) -> None:
    make_endpoint(sessions, other_tenant)
    refused(client.post("/callbacks/endpoints/enable", json={"url": URL}, headers=tenant.auth), 404)
    assert endpoint(sessions, other_tenant).disabled_at is not None


def test_enable_of_an_unknown_url_is_404(client: FlaskClient, tenant: Tenant) -> None:
    reply = client.post("/callbacks/endpoints/enable", json={"url": URL}, headers=tenant.auth)
    refused(reply, 404, "endpoint")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "url"),
        ({"url": 5}, "url"),
        ({"url": ""}, "url"),
        ({"url": URL, "force": True}, "force"),
        ([{"url": URL}], "body"),
    ],
)
def test_enable_validates_its_body(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant, body: Any, field: str
) -> None:
    make_endpoint(sessions, tenant)
    refused(client.post("/callbacks/endpoints/enable", json=body, headers=tenant.auth), 400, field)
    assert endpoint(sessions, tenant).disabled_at is not None


def test_enable_refuses_a_body_that_is_not_json(client: FlaskClient, tenant: Tenant) -> None:
    reply = client.post(
        "/callbacks/endpoints/enable",
        data=b"url=x",
        headers={**tenant.auth, "Content-Type": "application/json"},
    )
    refused(reply, 400, "JSON")


# --- the console commands --------------------------------------------------------------


def cli(settings: Settings, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["callbacks", *args], env=settings.to_env())
    return result.exit_code, result.output


def test_cli_lists_retries_and_enables(
    settings: Settings, sessions: sessionmaker[Session], tenant: Tenant, other_tenant: Tenant
) -> None:
    dead = make_callback(sessions, tenant)
    delivered = make_callback(sessions, tenant, state="delivered")
    make_endpoint(sessions, tenant)
    held = make_callback(sessions, tenant, state="held")

    code, out = cli(settings, "list", tenant.id, "--state", "dead")
    assert code == 0, out
    assert dead in out and delivered not in out and held not in out
    assert "1 of 1 callback(s)" in out

    code, out = cli(settings, "retry", tenant.id, dead)
    assert code == 0, out
    assert load(sessions, dead).state == "pending"

    code, out = cli(settings, "enable", tenant.id, URL)
    assert code == 0, out
    assert "1 held callback(s) released" in out
    assert load(sessions, held).state == "pending"
    assert endpoint(sessions, tenant).disabled_at is None


def test_cli_refusals_exit_non_zero_with_the_reason(
    settings: Settings, sessions: sessionmaker[Session], tenant: Tenant, other_tenant: Tenant
) -> None:
    theirs = make_callback(sessions, other_tenant)
    delivered = make_callback(sessions, tenant, state="delivered")

    code, out = cli(settings, "retry", tenant.id, theirs)
    assert code == 1 and "not found" in out
    code, out = cli(settings, "retry", tenant.id, delivered)
    assert code == 1 and "only dead or held" in out
    code, out = cli(settings, "enable", tenant.id, URL)
    assert code == 1 and "no such callback endpoint" in out
    code, out = cli(settings, "list", tenant.id, "--state", "bogus")
    assert code == 2
    with sessions() as session:
        assert session.scalar(select(Callback.state).where(Callback.id == theirs)) == "dead"
