"""8x8 Chat Apps API "Cancel batch of scheduled message": the same cancel as the native
DELETE, answered ``{"cancelledCount": N}`` or in 8x8's error shape."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.batches.models import Recipient
from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.states import BatchStatus, RecipientStatus
from tests.factories import Tenant
from tests.helpers import RecordingPublisher
from tests.helpers.mplus import load, minimum, numbers, refused, stamp


def url(sub_account: str, batch_id: str) -> str:
    return f"/api/v1/subaccounts/{sub_account}/messages/batch/{batch_id}"


MakeBatch = Callable[..., str]


@pytest.fixture()
def make_batch(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant, settings: Settings
) -> MakeBatch:
    """A scheduled batch of ``n`` recipients whose first ``sent`` were already sent."""

    def make(n: int = 4, sent: int = 1) -> str:
        later = stamp(utcnow() + timedelta(seconds=settings.schedule_horizon * 10))
        response = client.post(
            "/batch", json=minimum(destinations=numbers(n), send_at=later), headers=tenant.auth
        )
        assert response.status_code == 200
        batch_id = str(response.get_json()["identifier"])
        with transaction(sessions) as s:
            for r in s.scalars(
                select(Recipient).where(Recipient.batch_id == batch_id, Recipient.seq < sent)
            ):
                r.status = RecipientStatus.SENT
        return batch_id

    return make


def test_cancel_counts_what_the_native_cancel_counts(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant, make_batch: MakeBatch
) -> None:
    twin_a, twin_b = make_batch(n=5, sent=2), make_batch(n=5, sent=2)
    eight = client.delete(url(tenant.id, twin_a), headers=tenant.auth)
    native = client.delete(f"/batch/{twin_b}", headers=tenant.auth)
    assert eight.status_code == native.status_code == 200
    assert eight.get_json() == {"cancelledCount": native.get_json()["cancelledCount"]}
    assert eight.get_json() == {"cancelledCount": 3}
    for batch_id in (twin_a, twin_b):
        batch, recipients = load(sessions, batch_id)
        assert batch.status == BatchStatus.CANCELLED
        assert [r.status for r in recipients] == [RecipientStatus.SENT] * 2 + [
            RecipientStatus.CANCELLED
        ] * 3


def test_cancel_by_client_id(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    client_id = f"campaign-{uuid.uuid4().hex[:12]}"
    created = client.post("/batch", json=minimum(id=client_id), headers=tenant.auth)
    response = client.delete(url(tenant.id, client_id), headers=tenant.auth)
    assert response.get_json() == {"cancelledCount": 1}
    batch, _ = load(sessions, created.get_json()["identifier"])
    assert batch.status == BatchStatus.CANCELLED


def test_cancel_twice_counts_zero_the_second_time(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant, make_batch: MakeBatch
) -> None:
    batch_id = make_batch(n=2, sent=0)
    assert client.delete(url(tenant.id, batch_id), headers=tenant.auth).get_json() == {
        "cancelledCount": 2
    }
    again = client.delete(url(tenant.id, batch_id), headers=tenant.auth)
    assert again.status_code == 200
    assert again.get_json() == {"cancelledCount": 0}


def test_wrong_subaccount_is_1001_and_changes_nothing(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    other_tenant: Tenant,
    make_batch: MakeBatch,
) -> None:
    batch_id = make_batch()
    for sub_account in (other_tenant.id, str(uuid.uuid4()), "someone-else"):
        body = refused(client.delete(url(sub_account, batch_id), headers=tenant.auth), 400)
        assert body["code"] == 1001
        assert "subAccountId" in body["message"]
    batch, recipients = load(sessions, batch_id)
    assert batch.status == BatchStatus.SCHEDULED
    assert RecipientStatus.CANCELLED not in {r.status for r in recipients}


@pytest.mark.parametrize("sub_account", ["ab", "a" * 51, "bad!id", "sp%20ace", "caf%C3%A9"])
def test_bad_subaccount_pattern_is_400(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    make_batch: MakeBatch,
    sub_account: str,
) -> None:
    batch_id = make_batch()
    refused(client.delete(url(sub_account, batch_id), headers=tenant.auth), 400)
    assert load(sessions, batch_id)[0].status == BatchStatus.SCHEDULED


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic eDp5"}],
    ids=["none", "unknown", "basic"],
)
def test_no_auth_is_1200(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    make_batch: MakeBatch,
    headers: dict[str, str],
) -> None:
    batch_id = make_batch()
    body = refused(client.delete(url(tenant.id, batch_id), headers=headers), 401)
    assert body["code"] == 1200
    assert body["message"] == "Request was not authenticated properly"
    assert load(sessions, batch_id)[0].status == BatchStatus.SCHEDULED


def test_key_in_query_string_works(
    client: FlaskClient, sessions: sessionmaker[Session], tenant: Tenant, make_batch: MakeBatch
) -> None:
    batch_id = make_batch(n=3, sent=0)
    response = client.delete(url(tenant.id, batch_id) + f"?key={tenant.key}")
    assert response.get_json() == {"cancelledCount": 3}


def test_unknown_and_other_tenants_batches_are_404(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    other_tenant: Tenant,
    make_batch: MakeBatch,
) -> None:
    batch_id = make_batch()
    refused(client.delete(url(other_tenant.id, batch_id), headers=other_tenant.auth), 404)
    refused(client.delete(url(tenant.id, str(uuid.uuid4())), headers=tenant.auth), 404)
    refused(client.delete(url(tenant.id, "%00"), headers=tenant.auth), 404)
    assert load(sessions, batch_id)[0].status == BatchStatus.SCHEDULED


def test_other_methods_are_405_in_the_error_shape(client: FlaskClient, tenant: Tenant) -> None:
    body = refused(client.get(url(tenant.id, str(uuid.uuid4())), headers=tenant.auth), 405)
    assert body["code"] == 1405


def test_cancel_asks_workers_to_drop_the_batch_tasks(
    client: FlaskClient, tenant: Tenant, publisher: RecordingPublisher, settings: Settings
) -> None:
    """Revoke is only an optimisation, but it must name the dispatch and every chunk."""
    from dispatcher import outbox

    destinations = [f"+4477009{i:05d}" for i in range(settings.chunk_size + 1)]
    reply = client.post(
        "/batch",
        json={"from": "Acme", "message": "hi", "destinations": destinations},
        headers=tenant.auth,
    )
    batch_id = reply.get_json()["identifier"]
    client.delete(f"/api/v1/subaccounts/{tenant.id}/messages/batch/{batch_id}", headers=tenant.auth)
    (revoke,) = [m for m in publisher.messages if isinstance(m, outbox.Revoke)]
    assert revoke.task_ids == (
        f"dispatch_batch:{batch_id}",
        f"send_chunk:{batch_id}:0",
        f"send_chunk:{batch_id}:{settings.chunk_size}",
    )
