"""Inbound messages: the owning account, the webhook row, the Sinch inbounds API; both databases."""

from __future__ import annotations

from datetime import timedelta

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.batches.models import SharedSender
from dispatcher.db import transaction, utcnow
from dispatcher.errors import NotFound, ValidationError
from dispatcher.inbound import service
from dispatcher.webhooks.models import Callback
from tests.factories import Tenant
from tests.helpers import RecordingPublisher


def mo(sender: str, to: str, body: str = "hi", *, ago: float = 0) -> service.NewInbound:
    return service.NewInbound(
        sender=sender,
        to=to,
        body=body,
        carrier="local",
        connection="local-1",
        received_at=utcnow() - timedelta(seconds=ago),
    )


def test_a_dedicated_number_and_a_sticky_shared_sender_decide_the_account(
    sessions: sessionmaker[Session], tenant: Tenant, other_tenant: Tenant
) -> None:
    number = "+4477" + tenant.id.replace("-", "")[:8].translate(str.maketrans("abcdef", "123456"))
    with transaction(sessions) as session:
        # Stored in E.164 whatever the operator typed.
        assert (
            service.assign_number(
                session=session, number=number.lstrip("+"), account_id=tenant.id
            ).number
            == number
        )
        session.add(
            SharedSender(account_id=other_tenant.id, destination="+447700900321", sender="Notify")
        )
    with transaction(sessions) as session:
        stored = service.store_many(
            session=session,
            messages=[
                mo("+447700900111", number),
                mo("+447700900321", "Notify"),
                mo("+447700900999", "Notify"),
            ],
            now=utcnow(),
        )
    assert [m.account_id for m in stored] == [tenant.id, other_tenant.id, None]


def test_the_webhook_row_is_written_with_the_message_and_published_after_commit(
    sessions: sessionmaker[Session], tenant: Tenant, publisher: RecordingPublisher
) -> None:
    number = "+447711" + str(abs(hash(tenant.id)))[:6]
    with transaction(sessions) as session:
        service.assign_number(session=session, number=number, account_id=tenant.id)
        service.set_webhook(
            session=session,
            account_id=tenant.id,
            url="http://127.0.0.1:9/mo",
            dialect="sinch",
            allow=("127.0.0.1",),
        )
    with transaction(sessions) as session:
        (row,) = service.store_many(
            session=session, messages=[mo("+447700900111", number, "Grüße 😀")], now=utcnow()
        )
    with sessions() as session:
        (cb,) = session.scalars(select(Callback).where(Callback.account_id == tenant.id)).all()
    assert cb.event_type == "mo_text"
    assert cb.payload["id"] == row.id
    assert cb.payload["body"] == "Grüße 😀"
    assert cb.url == "http://127.0.0.1:9/mo"
    assert any(
        getattr(m, "task", None) == "deliver_callbacks" and cb.id in m.kwargs["callback_ids"]
        for m in publisher.messages
    )


def test_webhook_and_number_refusals(sessions: sessionmaker[Session], tenant: Tenant) -> None:
    with transaction(sessions) as session:
        with pytest.raises(ValidationError):
            service.set_webhook(
                session=session,
                account_id=tenant.id,
                url="http://10.0.0.1/mo",
                dialect="sinch",
                allow=(),
            )
        with pytest.raises(ValidationError):
            service.set_webhook(
                session=session,
                account_id=tenant.id,
                url="http://127.0.0.1:9/mo",
                dialect="klingon",
                allow=("127.0.0.1",),
            )
        with pytest.raises(ValidationError):
            service.assign_number(session=session, number="not-a-number", account_id=tenant.id)
        with pytest.raises(NotFound):
            service.assign_number(session=session, number="+447700900111", account_id="nope")


def test_sinch_inbounds_list_get_filters_and_isolation(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant, other_tenant: Tenant
) -> None:
    a, b = (
        "+447722" + tenant.id[:6].encode().hex()[:6],
        "+447733" + tenant.id[:6].encode().hex()[:6],
    )
    with transaction(sessions) as session:
        for n in (a, b):
            service.assign_number(session=session, number=n, account_id=tenant.id)
        service.store_many(
            session=session,
            messages=[
                mo("+447700900001", a, "first", ago=30),
                mo("+447700900002", b, "second", ago=20),
                mo("+447700900003", a, "old", ago=3 * 86400),
            ],
            now=utcnow(),
        )
    base = f"/xms/v1/{tenant.id}/inbounds"
    page = client.get(base, headers=tenant.auth).get_json()
    # Newest first; the 3-day-old one is outside the default 24 hours.
    assert [i["body"] for i in page["inbounds"]] == ["second", "first"]
    assert page["count"] == 2 and page["page"] == 0
    assert set(page["inbounds"][0]) == {"type", "id", "from", "to", "body", "received_at"}
    only_a = client.get(f"{base}?to={a}", headers=tenant.auth).get_json()
    assert [i["body"] for i in only_a["inbounds"]] == ["first"]
    since = (utcnow() - timedelta(days=4)).isoformat() + "Z"
    everything = client.get(f"{base}?start_date={since}&page_size=1", headers=tenant.auth)
    assert everything.get_json()["count"] == 3
    assert len(everything.get_json()["inbounds"]) == 1
    one_id = page["inbounds"][0]["id"]
    assert client.get(f"{base}/{one_id}", headers=tenant.auth).get_json()["body"] == "second"
    # Another tenant: its own plan finds nothing, and this plan is not its to read.
    other = f"/xms/v1/{other_tenant.id}/inbounds/{one_id}"
    assert client.get(other, headers=other_tenant.auth).status_code == 404
    assert client.get(base, headers=other_tenant.auth).status_code == 403
    bad = client.get(f"{base}?page_size=1000", headers=tenant.auth)
    assert bad.status_code == 400 and bad.get_json()["code"]
    assert client.get(f"{base}?colour=red", headers=tenant.auth).status_code == 400
