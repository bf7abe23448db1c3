"""Bad input on the Sinch batches API: a 400/404 in Sinch's shape, nothing stored, never a 500.

Also the database-error and unexpected-error replies, which must keep Sinch's shape.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from marshmallow import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from api.dialects.sinch import views
from api.dialects.sinch.errors import handle_schema
from dispatcher.batches.models import Batch
from dispatcher.db import utcnow
from tests.factories import Tenant
from tests.helpers.sinch import A, B, assert_error, created, send, url

FORMAT = "syntax_invalid_parameter_format"
CONSTRAINT = "syntax_constraint_violation"


def batches(sessions: sessionmaker[Session], tenant: Tenant) -> int:
    with sessions() as session:
        count = session.scalar(
            select(func.count()).select_from(Batch).where(Batch.account_id == tenant.id)
        )
    return int(count or 0)


def iso(delta: timedelta) -> str:
    return (utcnow() + delta).isoformat(timespec="seconds") + "Z"


UNSTORABLE = [
    pytest.param("a\x00b", "NUL", id="nul"),
    pytest.param("a\ud800b", "surrogate", id="lone-surrogate"),
    pytest.param("\udfff", "surrogate", id="lone-low-surrogate"),
]
TEXT_FIELDS: list[tuple[str, Any]] = [
    ("body", lambda bad: {"body": bad}),
    ("from", lambda bad: {"from": bad}),
    ("client_reference", lambda bad: {"client_reference": bad}),
    ("callback_url", lambda bad: {"callback_url": f"http://127.0.0.1:9/{bad}"}),
    ("udh", lambda bad: {"type": "mt_binary", "body": "SGVsbG8=", "udh": bad}),
    ("parameters", lambda bad: {"parameters": {"name": {"default": bad}}}),
    ("parameters", lambda bad: {"parameters": {bad: {"default": "x"}}}),
    ("parameters", lambda bad: {"parameters": {"name": {A: "ok", bad: "x"}}}),
]


@pytest.mark.parametrize(("bad", "kind"), UNSTORABLE)
@pytest.mark.parametrize(("name", "make"), TEXT_FIELDS)
def test_unstorable_text_is_refused_and_nothing_stored(
    client: FlaskClient,
    tenant: Tenant,
    sessions: sessionmaker[Session],
    bad: str,
    kind: str,
    name: str,
    make: Any,
) -> None:
    before = batches(sessions, tenant)
    text = assert_error(send(client, tenant, **make(bad)), 400, FORMAT)
    assert name in text, text
    assert batches(sessions, tenant) == before


@pytest.mark.parametrize(("bad", "kind"), UNSTORABLE)
def test_unstorable_text_in_update_and_list_is_refused(
    client: FlaskClient, tenant: Tenant, bad: str, kind: str
) -> None:
    batch = created(client, tenant, send_at=iso(timedelta(days=1)))
    for body in ({"body": bad}, {"from": bad}, {"callback_url": f"http://127.0.0.1:9/{bad}"}):
        response = client.post(url(tenant, f"/{batch['id']}"), json=body, headers=tenant.auth)
        assert next(iter(body)) in assert_error(response, 400, FORMAT)
    got = client.get(url(tenant, f"/{batch['id']}"), headers=tenant.auth).get_json()
    assert got == batch
    # Query strings cannot carry lone surrogates (they decode to U+FFFD); NUL they can.
    for name in ("from", "client_reference"):
        response = client.get(url(tenant), query_string={name: "a\x00"}, headers=tenant.auth)
        assert name in assert_error(response, 400, FORMAT)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested-lists"),
        pytest.param(b'{"a":' * 100_000 + b"1" + b"}" * 100_000, id="nested-objects"),
        pytest.param(b"1" * 5_000, id="huge-integer"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b"", id="empty"),
        pytest.param(b"null", id="null"),
    ],
)
def test_unparseable_json_is_syntax_invalid_json(
    client: FlaskClient, tenant: Tenant, sessions: sessionmaker[Session], raw: bytes
) -> None:
    batch = created(client, tenant, send_at=iso(timedelta(days=1)), feedback_enabled=True)
    before = batches(sessions, tenant)
    headers = {**tenant.auth, "Content-Type": "application/json"}
    for method, suffix in [
        ("post", ""),
        ("post", "/dry_run"),
        ("post", f"/{batch['id']}"),
        ("put", f"/{batch['id']}"),
        ("post", f"/{batch['id']}/delivery_feedback"),
    ]:
        response = getattr(client, method)(url(tenant, suffix), data=raw, headers=headers)
        assert_error(response, 400, "syntax_invalid_json")
    assert batches(sessions, tenant) == before


def test_schema_errors_keep_field_names(client: FlaskClient, tenant: Tenant) -> None:
    text = assert_error(send(client, tenant, callback_url="http://10.0.0.1/cb"), 400, CONSTRAINT)
    assert text.startswith("callback_url: "), text
    text = assert_error(send(client, tenant, type="mt_binary", body="SGVsbG8="), 400, CONSTRAINT)
    assert text.startswith("udh: "), text
    # A field-named error raised outside a schema keeps its name too.
    with client.application.test_request_context():
        reply = handle_schema(ValidationError("must be hex digits", "udh"))
    assert reply.get_json() == {"code": FORMAT, "text": "udh: must be hex digits"}


NOT_BATCH_IDS = ["%00", "a%00b", "a" * 101, "%ED%A0%80", "%FF"]


@pytest.mark.parametrize("raw", NOT_BATCH_IDS)
def test_ids_that_cannot_name_a_batch_are_not_found(
    client: FlaskClient, tenant: Tenant, raw: str
) -> None:
    body = {"to": [A], "from": "x", "body": "y"}
    calls: list[tuple[str, str, Any]] = [
        ("get", f"/{raw}", None),
        ("post", f"/{raw}", {"body": "x"}),
        ("put", f"/{raw}", body),
        ("delete", f"/{raw}", None),
        ("post", f"/{raw}/delivery_feedback", {"recipients": []}),
        ("get", f"/{raw}/delivery_report", None),
        ("get", f"/{raw}/delivery_report/{A}", None),
    ]
    for method, suffix, json_body in calls:
        response = getattr(client, method)(url(tenant, suffix), json=json_body, headers=tenant.auth)
        assert_error(response, 404, "not_found")


@pytest.mark.parametrize(
    "recipient", ["\u0664\u0664\u0667\u0667", "\uff14\uff14\uff17\uff17", "%00", "abc", "+"]
)
def test_recipient_in_the_path_must_be_an_ascii_number(
    client: FlaskClient, tenant: Tenant, recipient: str
) -> None:
    batch = created(client, tenant)
    response = client.get(
        url(tenant, f"/{batch['id']}/delivery_report/{recipient}"), headers=tenant.auth
    )
    assert "recipient" in assert_error(response, 400, FORMAT)


@pytest.mark.parametrize(
    "when",
    [
        "9999-12-31T23:59:59Z",
        "9999-12-31T23:59:59-23:59",
        "0001-01-01T00:00:00+23:59",
        "9000-01-01T00:00:00Z",
    ],
)
def test_out_of_range_times_are_400(
    client: FlaskClient, tenant: Tenant, sessions: sessionmaker[Session], when: str
) -> None:
    before = batches(sessions, tenant)
    for name in ("send_at", "expire_at"):
        assert name in assert_error(send(client, tenant, **{name: when}), 400, CONSTRAINT)
    batch = created(client, tenant, send_at=iso(timedelta(days=1)))
    for name in ("send_at", "expire_at"):
        response = client.post(
            url(tenant, f"/{batch['id']}"), json={name: when}, headers=tenant.auth
        )
        assert name in assert_error(response, 400, CONSTRAINT)
    for name in ("start_date", "end_date"):
        response = client.get(url(tenant), query_string={name: when}, headers=tenant.auth)
        assert name in assert_error(response, 400, CONSTRAINT)
    assert batches(sessions, tenant) == before + 1


def test_wrongly_typed_times_are_format_errors(client: FlaskClient, tenant: Tenant) -> None:
    for value in (12345, ["2024-01-01"], {"at": "now"}, "tomorrow"):
        assert_error(send(client, tenant, send_at=value), 400, FORMAT)


@pytest.mark.parametrize(
    "key",
    [
        "\u0664\u0664\u0667\u0667\u0660\u0660\u0669\u0660\u0660\u0660\u0660\u0661",
        "\uff14\uff14\uff17\uff17\uff10\uff10\uff19\uff10\uff10\uff10\uff10\uff11",
        "44-7700-900001",
        "Default",
    ],
)
def test_parameter_keys_are_ascii_msisdns(client: FlaskClient, tenant: Tenant, key: str) -> None:
    response = send(client, tenant, body="Hi ${name}", parameters={"name": {key: "Joe"}})
    text = assert_error(response, 400, FORMAT)
    assert text.startswith("parameters.name."), text


def test_two_parameter_keys_for_one_number_are_refused(
    client: FlaskClient, tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    # With and without its +, one number: which value it gets must not be left to chance.
    before = batches(sessions, tenant)
    values = {A: "Joe", A.lstrip("+"): "Ann"}
    response = send(client, tenant, body="Hi ${name}", parameters={"name": values})
    text = assert_error(response, 400, CONSTRAINT)
    assert text.startswith("parameters.name."), text
    assert batches(sessions, tenant) == before
    same = send(client, tenant, body="Hi ${name}", parameters={"name": {A: "Joe", A[1:]: "Joe"}})
    assert same.status_code == 201, same.get_data(as_text=True)


def test_parameter_values_cannot_expand_the_body_past_its_limit(
    client: FlaskClient, tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    before = batches(sessions, tenant)
    body = "${n}" * 400
    response = send(client, tenant, to=[A, B], body=body, parameters={"n": {"default": "x" * 10}})
    text = assert_error(response, 400, CONSTRAINT)
    assert "parameters" in text and "2000" in text
    assert batches(sessions, tenant) == before
    fits = send(client, tenant, to=[A], body=body, parameters={"n": {"default": "x" * 5}})
    assert fits.status_code == 201, fits.get_json()
    # Updating the body of a batch with parameters renders it again, with the same limit.
    batch = created(
        client, tenant, send_at=iso(timedelta(days=1)), parameters={"n": {"default": "x" * 10}}
    )
    response = client.post(url(tenant, f"/{batch['id']}"), json={"body": body}, headers=tenant.auth)
    assert "parameters" in assert_error(response, 400, CONSTRAINT)


def _raise(exc: Exception) -> Any:
    def fail(**_: Any) -> Any:
        raise exc

    return fail


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (IntegrityError("INSERT", {}, Exception("unique violation")), 409, "conflict"),
        (
            OperationalError("INSERT", {}, Exception("database is locked")),
            503,
            "service_unavailable",
        ),
        (RuntimeError("a bug"), 500, "internal_error"),
    ],
)
def test_database_and_unexpected_errors_keep_sinch_shape(
    client: FlaskClient,
    tenant: Tenant,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    exc: Exception,
    status: int,
    code: str,
) -> None:
    before = batches(sessions, tenant)
    monkeypatch.setattr(views.service, "create_batch", _raise(exc))
    assert_error(send(client, tenant), status, code)
    assert batches(sessions, tenant) == before
