"""API keys on the native endpoints: ``?key=`` or Bearer, 401 otherwise, and tenants
that never see each other's batches (404, not 403)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from dispatcher.accounts import service as accounts
from dispatcher.batches.models import Batch, Recipient
from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.inbound import service as inbound
from dispatcher.runtime import Runtime
from dispatcher.states import BatchStatus, RecipientStatus
from tests.factories import Tenant
from tests.helpers import RecordingPublisher
from tests.helpers.mplus import Ledger, load, minimum, refused, rows

MESSAGE = {"messages": [{"from": {"type": "shared"}, "to": "441111111111", "body": "b"}]}


@pytest.fixture()
def ledger(
    sessions: sessionmaker[Session], tenant: Tenant, publisher: RecordingPublisher
) -> Ledger:
    return Ledger(sessions, tenant, publisher)


@pytest.fixture()
def batch_id(client: FlaskClient, tenant: Tenant) -> str:
    """A queued batch of two recipients owned by ``tenant``."""
    response = client.post(
        "/batch", json=minimum(destinations=["441111111111", "442222222222"]), headers=tenant.auth
    )
    assert response.status_code == 200
    return str(response.get_json()["identifier"])


def unauthorized(response: Any) -> None:
    body = refused(response, 401)
    assert body["code"] == 1200
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


# --- ways in ---------------------------------------------------------------------------


def test_key_in_query_string(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    response = client.post(f"/batch?key={tenant.key}", json=minimum())
    assert response.status_code == 200
    assert rows(sessions, tenant.id) == (1, 1)
    got = client.get(f"/batch/{response.get_json()['identifier']}?key={tenant.key}")
    assert got.status_code == 200


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_bearer_header(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant, scheme: str
) -> None:
    response = client.post(
        "/batch", json=minimum(), headers={"Authorization": f"{scheme} {tenant.key}"}
    )
    assert response.status_code == 200
    assert rows(sessions, tenant.id) == (1, 1)


def test_message_endpoint_takes_either(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    assert client.post(f"/message?key={tenant.key}", json=MESSAGE).status_code == 200
    assert client.post("/message", json=MESSAGE, headers=tenant.auth).status_code == 200
    assert rows(sessions, tenant.id) == (2, 2)


# --- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer   "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer dsp_not-a-key"},
        {"Authorization": "Bearer " + "x" * 5000},
    ],
    ids=["none", "empty-bearer", "blank-bearer", "basic", "unknown", "huge"],
)
def test_missing_or_unknown_key_is_401(
    client: FlaskClient, ledger: Ledger, headers: dict[str, str]
) -> None:
    unauthorized(client.post("/batch", json=minimum(), headers=headers))
    unauthorized(client.post("/message", json=MESSAGE, headers=headers))
    ledger.assert_unchanged()


@pytest.mark.parametrize("query", ["?key=", "?key=nope", "?key=%00", "?key=%F0%9F%94%91"])
def test_bad_key_in_query_is_401(client: FlaskClient, ledger: Ledger, query: str) -> None:
    unauthorized(client.post(f"/batch{query}", json=minimum()))
    ledger.assert_unchanged()


def test_revoked_key_is_401(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant, ledger: Ledger
) -> None:
    with transaction(sessions) as session:
        accounts.revoke_key(session=session, key_id=tenant.key_id)
    unauthorized(client.post("/batch", json=minimum(), headers=tenant.auth))
    unauthorized(client.post(f"/batch?key={tenant.key}", json=minimum()))
    unauthorized(client.post("/message", json=MESSAGE, headers=tenant.auth))
    unauthorized(client.get(f"/batch/{uuid.uuid4()}", headers=tenant.auth))
    ledger.assert_unchanged()


def test_a_second_key_works_after_the_first_is_revoked(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    with transaction(sessions) as session:
        accounts.revoke_key(session=session, key_id=tenant.key_id)
        fresh = accounts.create_key(session=session, account_id=tenant.id)
    response = client.post(
        "/batch", json=minimum(), headers={"Authorization": f"Bearer {fresh.key}"}
    )
    assert response.status_code == 200
    assert rows(sessions, tenant.id) == (1, 1)


def test_every_endpoint_needs_a_key(client: FlaskClient, batch_id: str, tenant: Tenant) -> None:
    unauthorized(client.get(f"/batch/{batch_id}"))
    unauthorized(client.get(f"/batch/{batch_id}/messages"))
    unauthorized(client.delete(f"/batch/{batch_id}"))
    unauthorized(client.delete(f"/api/v1/subaccounts/{tenant.id}/messages/batch/{batch_id}"))
    assert client.get(f"/batch/{batch_id}", headers=tenant.auth).get_json()["status"] == "queued"


def test_authentication_comes_before_validation(client: FlaskClient, ledger: Ledger) -> None:
    # An anonymous caller learns nothing about what the API would accept.
    unauthorized(client.post("/batch?bogus=1", json={"nonsense": True}))
    unauthorized(client.post("/batch", data="{not json", content_type="application/json"))
    unauthorized(client.post("/message?dryRun=maybe", json={}))
    unauthorized(client.get(f"/batch/{uuid.uuid4()}/messages?page=-1"))
    ledger.assert_unchanged()


# --- tenant isolation ------------------------------------------------------------------


def test_other_tenant_cannot_read_list_or_cancel(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    other_tenant: Tenant,
    batch_id: str,
) -> None:
    theirs = other_tenant.auth
    for response in (
        client.get(f"/batch/{batch_id}", headers=theirs),
        client.get(f"/batch/{batch_id}/messages", headers=theirs),
        client.get(f"/batch/{batch_id}/messages?status=scheduled", headers=theirs),
        client.delete(f"/batch/{batch_id}", headers=theirs),
        client.delete(
            f"/api/v1/subaccounts/{other_tenant.id}/messages/batch/{batch_id}", headers=theirs
        ),
    ):
        body = refused(response, 404)
        assert batch_id in body["message"] or "not found" in body["message"]
    batch, recipients = load(sessions, batch_id)
    assert batch.status == BatchStatus.QUEUED
    assert {r.status for r in recipients} == {RecipientStatus.SCHEDULED}
    assert client.get(f"/batch/{batch_id}", headers=tenant.auth).status_code == 200


def test_other_tenant_cannot_reach_a_batch_by_its_client_id(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    other_tenant: Tenant,
) -> None:
    client_id = str(uuid.uuid4())
    created = client.post("/batch", json=minimum(id=client_id), headers=tenant.auth)
    assert created.status_code == 200
    refused(client.get(f"/batch/{client_id}", headers=other_tenant.auth), 404)
    refused(client.delete(f"/batch/{client_id}", headers=other_tenant.auth), 404)
    # Reusing the id is no conflict for the other tenant: nothing leaks that it exists.
    theirs = client.post(
        "/batch", json=minimum(id=client_id, message="different"), headers=other_tenant.auth
    )
    assert theirs.status_code == 200
    assert theirs.get_json()["identifier"] != created.get_json()["identifier"]
    with sessions() as s:
        owners = s.scalars(select(Batch.account_id).where(Batch.client_id == client_id)).all()
    assert sorted(owners) == sorted([tenant.id, other_tenant.id])


def test_listing_shows_only_the_batchs_own_recipients(
    client: FlaskClient, tenant: Tenant, other_tenant: Tenant, batch_id: str
) -> None:
    other = client.post("/batch", json=minimum(), headers=other_tenant.auth)
    assert other.status_code == 200
    body = client.get(f"/batch/{batch_id}/messages", headers=tenant.auth).get_json()
    assert [m["to"] for m in body["messages"]] == ["+441111111111", "+442222222222"]
    assert body["total"] == 2


def test_shared_senders_do_not_cross_tenants(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant, other_tenant: Tenant
) -> None:
    assert client.post("/message", json=MESSAGE, headers=tenant.auth).status_code == 200
    with sessions() as s:
        mine = s.scalars(select(Recipient.account_id).where(Recipient.account_id == tenant.id))
        assert list(mine) == [tenant.id]
    assert rows(sessions, other_tenant.id) == (0, 0)


def test_a_reply_to_a_sender_id_two_tenants_share_goes_to_neither(
    settings: Settings, sessions: sessionmaker[Session], tenant: Tenant, other_tenant: Tenant
) -> None:
    """A pool of one: both tenants message the same number from the same sender ID. The
    number's reply cannot say which of them it answers, so neither may read it: the
    second tenant must not capture the first one's replies by messaging its customers."""
    rt = Runtime(settings.replace(shared_senders=("Solo",)), RecordingPublisher())
    api = create_app(rt.settings, runtime=rt).test_client()
    number = "+4479" + str(int(uuid.UUID(tenant.id)))[:8]
    body = {"messages": [{"from": {"type": "shared"}, "to": number, "body": "b"}]}
    try:
        for who in (tenant, other_tenant):
            assert api.post("/message", json=body, headers=who.auth).status_code == 200
        with transaction(sessions) as session:
            (reply,) = inbound.store_many(
                session=session,
                messages=[
                    inbound.NewInbound(
                        sender=number,
                        to="Solo",
                        body="STOP, this is for the first tenant",
                        carrier="local",
                        connection="local-1",
                        received_at=utcnow(),
                    )
                ],
                now=utcnow(),
            )
        assert reply.account_id is None
        for who in (tenant, other_tenant):
            listed = api.get(f"/xms/v1/{who.id}/inbounds", headers=who.auth)
            assert listed.status_code == 200
            assert listed.get_json()["inbounds"] == []
    finally:
        rt.dispose()


def test_a_client_id_that_names_another_of_the_accounts_batches_is_a_conflict(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    first = client.post("/batch", json=minimum(), headers=tenant.auth).get_json()["identifier"]
    reused = client.post("/batch", json=minimum(id=first, message="other"), headers=tenant.auth)
    assert reused.status_code == 409
    assert rows(sessions, tenant.id) == (1, 1)
