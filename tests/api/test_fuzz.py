"""Property-based fuzzing of every route of the API through the Flask test client.

Whatever a client sends (random JSON, valid bodies with one field broken, junk in the
path and the query string, with or without credentials), the answer is never a 5xx,
an error is JSON in its dialect's shape, and a refused write stores nothing.

Hypothesis runs derandomized and without its example database, so every run (and CI)
tries the same examples. Sweeps beside it try the nastiest values in every field,
query parameter and path segment on every run. Known 500s in code this file's authors
do not own are listed in DEFECTS: each is a strict xfail case, and only its own class
of inputs is kept out of the properties until it is fixed.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any
from urllib.parse import quote, unquote

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Rule
from werkzeug.test import TestResponse

from api.app import create_app
from dispatcher import health
from dispatcher.batches.models import Batch, Recipient
from dispatcher.config import Settings
from dispatcher.db import utcnow
from dispatcher.runtime import Runtime
from tests.factories import Tenant
from tests.helpers import RecordingPublisher
from tests.helpers.sinch import mark_sent, start_sending

A, B, C = "+447700900001", "+447700900002", "+447700900003"
SECRET = "dlr-fuzz-0123456789abcdef"
CLIENT_ID = "0f0f0f0f-0000-4000-8000-00000000fb01"


def fuzz(examples: int) -> settings:
    """Hypothesis settings of this file: repeatable (derandomized, no example database)."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# --- the app under test -----------------------------------------------------------------


@dataclass(repr=False)
class World:
    """The app, a tenant with two real batches, and the database kind in use."""

    client: FlaskClient
    sessions: sessionmaker[Session]
    tenant: Tenant
    settings: Settings
    database: str  # "sqlite" or "postgresql"
    batch_id: str  # a scheduled Sinch batch to A and B
    native_id: str  # a scheduled Messaging Plus batch to A, also named by CLIENT_ID
    rules: dict[str, Rule]
    group_id: str = ""  # a Sinch group of A and B
    stored: tuple[Any, ...] = ()  # snapshot() after the last accepted write

    @property
    def app(self) -> Flask:
        return self.client.application

    def __repr__(self) -> str:  # what Hypothesis prints with a falsifying example
        return f"World({self.database}, batch_id={self.batch_id!r}, native_id={self.native_id!r})"


@pytest.fixture()
def client(settings: Settings, publisher: RecordingPublisher) -> Iterator[FlaskClient]:
    """The API with a receipt secret for /dlr/http, so carrier bodies get past auth too."""
    rt = Runtime(
        settings.replace(
            dlr_secrets={"http": SECRET},
            # The vendor webhooks exist only with their secrets: configured, they are fuzzed.
            rbm_client_token=SECRET,
            whatsapp_app_secret=SECRET,
            whatsapp_verify_token=SECRET,
            twilio_auth_token=SECRET,
        ),
        publisher,
    )
    yield create_app(rt.settings, runtime=rt).test_client()
    rt.dispose()


@pytest.fixture()
def world(
    client: FlaskClient, tenant: Tenant, sessions: sessionmaker[Session], settings: Settings
) -> World:
    sinch = client.post(
        f"/xms/v1/{tenant.id}/batches",
        json={
            "from": "12345",
            "to": [A, B],
            "body": "Hi ${name}",
            "parameters": {"name": {A: "Ann", "default": "you"}},
            "send_at": later(1),
            "feedback_enabled": True,
            "delivery_report": "full",
            "client_reference": "fuzz",
        },
        headers=tenant.auth,
    )
    assert sinch.status_code == 201, sinch.get_json()
    native = client.post(
        "/batch",
        json={
            "from": "Fuzz",
            "message": "Hi",
            "destinations": [A],
            "id": CLIENT_ID,
            "at": later(1),
        },
        headers=tenant.auth,
    )
    assert native.status_code == 200, native.get_json()
    group = client.post(
        f"/xms/v1/{tenant.id}/groups", json={"name": "Fuzz", "members": [A, B]}, headers=tenant.auth
    )
    assert group.status_code == 201, group.get_json()
    # /health/ready answers 200 only with a worker on every queue: stand in for them.
    redis_client = client.application.extensions["dispatcher"].redis
    health.beat(client=redis_client, queues=health.QUEUES, hostname="fuzz@test", ttl=120)
    made = World(
        client=client,
        sessions=sessions,
        tenant=tenant,
        settings=settings,
        database="postgresql" if settings.database_url.startswith("postgresql") else "sqlite",
        batch_id=sinch.get_json()["id"],
        native_id=native.get_json()["identifier"],
        rules={r.endpoint: r for r in client.application.url_map.iter_rules()},
        group_id=group.get_json()["id"],
    )
    made.stored = snapshot(made)
    return made


# --- what each endpoint accepts when the request is right -------------------------------


@dataclass(frozen=True)
class Valid:
    """A request an endpoint accepts: its body (None: no body) and its query string."""

    body: Any = None
    query: dict[str, str] = field(default_factory=dict)


def later(days: float) -> str:
    return (utcnow() + timedelta(days=days)).isoformat(timespec="seconds") + "Z"


def valid_request(endpoint: str) -> Valid:
    """The valid request of ``endpoint``, every optional field set (times relative to now)."""
    sinch_send = {
        "from": "12345",
        "to": [A, B],
        "body": "Hello ${name}",
        "type": "mt_text",
        "delivery_report": "per_recipient",
        "send_at": later(1),
        "expire_at": later(2),
        "callback_url": "http://127.0.0.1:9/cb",
        "client_reference": "ref",
        "feedback_enabled": True,
        "flash_message": False,
        "truncate_concat": True,
        "max_number_of_message_parts": 3,
        "parameters": {"name": {A: "Ann", "default": "you"}},
        "from_ton": 1,
        "from_npi": 1,
    }
    page = {"page": "0", "pageSize": "10"}
    table = {
        "mplus.create_batch": Valid(
            {
                "from": "Dispatcher",
                "message": "Hello",
                "destinations": [A, B],
                "callback": "http://127.0.0.1:9/cb",
                "id": "0f0f0f0f-0000-4000-8000-00000000fc01",
                "send_at": later(1),
                "channel": "sms",
                "fallback_channels": ["sms"],
            },
            {"dryRun": "false", "allowMulti": "true"},
        ),
        "mplus.create_messages": Valid(
            {
                "messages": [
                    {"to": A, "body": "Hi", "id": "0f0f0f0f-0000-4000-8000-00000000f301"},
                    {"to": B},
                ],
                "defaults": {
                    "from": {"type": "custom", "value": "Shop"},
                    "body": "Hello",
                    "channels": ["sms"],
                    "callback": "http://127.0.0.1:9/cb",
                    "send_at": later(1),
                },
            },
            {"dryRun": "false"},
        ),
        "mplus.get_batch": Valid(),
        "mplus.list_messages": Valid(None, {**page, "status": "scheduled"}),
        "mplus.cancel_batch": Valid(),
        "eightbyeight.cancel_batch": Valid(),
        "reports.batch_report": Valid(None, {**page, "status": "queued"}),
        "callbacks.list_callbacks": Valid(None, {**page, "state": "dead"}),
        "callbacks.retry_callback": Valid(),
        "callbacks.list_endpoints": Valid(),
        "callbacks.enable_endpoint": Valid({"url": "http://127.0.0.1:9/cb"}),
        "dlr.receive": Valid(
            [
                {"id": "carrier-1", "status": "delivered"},
                {"id": "carrier-2", "status": "failed", "error": {"code": "1", "text": "busy"}},
            ]
        ),
        "ops.health_check": Valid(),
        "ops.live": Valid(),
        "ops.ready": Valid(),
        "rbm_webhook.events": Valid(
            {
                "message": {"data": "eyJldmVudFR5cGUiOiAiUkVBRCJ9", "messageId": "1"},
                "subscription": "s",
            }
        ),
        "whatsapp_webhook.verify": Valid(
            None, {"hub.mode": "subscribe", "hub.verify_token": SECRET, "hub.challenge": "123"}
        ),
        "whatsapp_webhook.notify": Valid({"object": "whatsapp_business_account", "entry": []}),
        "twilio_webhook.status": Valid({"MessageSid": "SM1", "MessageStatus": "delivered"}),
        "ops.metrics": Valid(),
        "ops.openapi_document": Valid(),
        "ops.docs": Valid(),
        "ops.docs_asset": Valid(),
        "static": Valid(),
        "sinch.send": Valid(sinch_send),
        "sinch.list_batches": Valid(
            None,
            {
                "page": "0",
                "page_size": "10",
                "from": "12345,Shop",
                "start_date": later(-1),
                "end_date": later(1),
                "client_reference": "fuzz",
            },
        ),
        "sinch.dry_run": Valid(sinch_send, {"per_recipient": "true", "number_of_recipients": "5"}),
        "sinch.get_batch": Valid(),
        "sinch.update_batch": Valid(
            {
                "from": "Shop",
                "body": "Bye ${name}",
                "to_add": [C],
                "to_remove": [B],
                "delivery_report": "summary",
                "send_at": later(1),
                "expire_at": later(2),
                "callback_url": "http://127.0.0.1:9/new",
            }
        ),
        "sinch.replace_batch": Valid(sinch_send),
        "sinch.cancel_batch": Valid(),
        "sinch.delivery_feedback": Valid({"recipients": [A]}),
        "sinch.delivery_report": Valid(
            None, {"type": "full", "status": "Queued,Delivered", "code": "400,0"}
        ),
        "sinch.recipient_delivery_report": Valid(),
        "sinch.list_delivery_reports": Valid(
            None,
            {
                "page": "0",
                "page_size": "10",
                "start_date": later(-1),
                "end_date": later(1),
                "status": "QUEUED,Delivered",
                "code": "400,0",
                "client_reference": "fuzz",
            },
        ),
        "sinch.create_group": Valid({"name": "Team", "members": [A, C]}),
        "sinch.list_groups": Valid(None, {"page": "0", "page_size": "10"}),
        "sinch.get_group": Valid(),
        "sinch.replace_group": Valid({"name": "Team", "members": [A, C]}),
        "sinch.update_group": Valid({"name": "Team", "add": [C], "remove": [A]}),
        "sinch.delete_group": Valid(),
        "sinch.list_members": Valid(),
        "sinch_inbounds.list_inbounds": Valid(
            None,
            {"page": "0", "page_size": "10", "to": "447700,Shop", "start_date": later(-1)},
        ),
        "sinch_inbounds.get_inbound": Valid(),
    }
    return table[endpoint]


# Every endpoint of the app (test_every_route_is_fuzzed keeps this list honest).
ENDPOINTS = [
    "mplus.create_batch",
    "mplus.create_messages",
    "mplus.get_batch",
    "mplus.list_messages",
    "mplus.cancel_batch",
    "eightbyeight.cancel_batch",
    "reports.batch_report",
    "callbacks.list_callbacks",
    "callbacks.retry_callback",
    "callbacks.list_endpoints",
    "callbacks.enable_endpoint",
    "dlr.receive",
    "ops.health_check",
    "ops.live",
    "ops.ready",
    "rbm_webhook.events",
    "whatsapp_webhook.verify",
    "whatsapp_webhook.notify",
    "twilio_webhook.status",
    "ops.metrics",
    "ops.openapi_document",
    "ops.docs",
    "ops.docs_asset",
    "static",
    "sinch.send",
    "sinch.list_batches",
    "sinch.dry_run",
    "sinch.get_batch",
    "sinch.update_batch",
    "sinch.replace_batch",
    "sinch.cancel_batch",
    "sinch.delivery_feedback",
    "sinch.delivery_report",
    "sinch.recipient_delivery_report",
    "sinch.list_delivery_reports",
    "sinch.create_group",
    "sinch.list_groups",
    "sinch.get_group",
    "sinch.replace_group",
    "sinch.update_group",
    "sinch.delete_group",
    "sinch.list_members",
    "sinch_inbounds.list_inbounds",
    "sinch_inbounds.get_inbound",
]
WITH_BODY = [e for e in ENDPOINTS if valid_request(e).body is not None]
WITH_QUERY = [e for e in ENDPOINTS if valid_request(e).query]


def keys_of(value: Any) -> set[str]:
    """Every dict key anywhere in ``value`` (the names a schema looks at)."""
    if isinstance(value, dict):
        return {str(k) for k in value} | {k for v in value.values() for k in keys_of(v)}
    if isinstance(value, list):
        return {k for v in value for k in keys_of(v)}
    return set()


def places(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value one mutation can hit, the root first."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += places(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += places(v, (*prefix, i))
    return out


def mutate(value: Any, where: tuple[Any, ...], op: str, new: Any) -> Any:
    """A copy of ``value`` with ``where`` replaced, deleted or given an unknown sibling key."""
    if not where:
        return new if op == "replace" else value
    copy = json.loads(json.dumps(value))
    parent = copy
    for step in where[:-1]:
        parent = parent[step]
    last = where[-1]
    if op == "delete":
        del parent[last]
    elif op == "unknown" and isinstance(parent, dict):
        parent[f"{last}_unknown"] = new
    else:
        parent[last] = new
    return copy


# --- values -----------------------------------------------------------------------------

# A marker json.dumps escapes, replaced in the bytes by nesting json.dumps could not write.
DEEP = "\x00deep:{}\x00"
DEPTHS = (50, 500, 900, 3_000, 100_000)

EDGE_TEXT = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",
    "x\udfffy",
    "\udbff\udfff",  # a pair written as two escapes: one valid character
    "\u202eevil\u202c",
    "\u200f\u200e",
    "\ufeff",
    "\U0001f600" * 40,
    "\U0010ffff",
    "e\u0301",
    "\u0085\u2028\u2029",
    "\t\r\n",
    "\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669",  # Arabic-Indic digits
    "\uff0b\uff14\uff14\uff17\uff17\uff10\uff10\uff19",  # fullwidth +447709
    "\u00b2\u00b3",
    "${name}" * 300,
    "%00",
    "' OR '1'='1",
    "x" * 70_000,
    "\U0001f600" * 5_000,
    "Infinity",
    "null",
    "1e999",
]
EDGE_TIMES = [
    "9999-12-31T23:59:59Z",
    "9999-12-31T23:59:59-23:59",
    "8999-12-31T23:59:59Z",
    "0001-01-01T00:00:00+23:59",
    "0001-01-01T00:00:00Z",
    "2024-02-30T00:00:00Z",
    "2024-01-01T24:00:00Z",
    "2024-01-01T00:00:00+99:00",
    "2024-01-01T00:00:00.123456789Z",
    "2024-01-01",
    "20240101T000000Z",
    "now",
]
EDGE_URLS = [
    "http://127.0.0.1:99999/",
    "http://[::1/",
    "http://10.0.0.1/",
    "http://169.254.169.254/latest",
    "file:///etc/passwd",
    "http://\x00/",
    "http://\ud800/",
    "http://a\u202eb/",
    "http://xn--/",
    "http://127.0.0.1:9/" + "a" * 3_000,
    "javascript:alert(1)",
]
EDGE_NUMBERS: list[Any] = [
    0,
    -1,
    255,
    256,
    1001,
    -(2**63) - 1,
    2**63,
    2**64,
    10**30,
    -(10**30),
    10**4000,
    1.5,
    -0.0,
    1e308,
    5e-324,
    math.inf,
    -math.inf,
    math.nan,
]
# What the sweeps put in every place, one at a time.
NASTY_JSON: list[Any] = ["\x00", "\ud800", None, {}, "x" * 70_000]
NASTY_QUERY: list[str | bytes] = ["\x00", b"\xed\xa0\x80", b"\xff", "x" * 5_000, "-1", "9" * 30]
NASTY_SEGMENTS = ["%00", "%ED%A0%80", "%FF", "a" * 5_000, ".."]

text = st.text(st.characters(exclude_categories=()), max_size=40)  # lone surrogates included
edge_text = st.sampled_from(EDGE_TEXT + EDGE_TIMES + EDGE_URLS)
any_text = st.one_of(text, edge_text, st.sampled_from([A, "447700900001", "+1", "+", "default"]))
numbers = st.one_of(st.integers(), st.floats(), st.sampled_from(EDGE_NUMBERS))
scalars = st.one_of(st.none(), st.booleans(), numbers, any_text)
deep = st.sampled_from(DEPTHS).map(DEEP.format)
json_values = st.recursive(
    st.one_of(scalars, deep),
    lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(st.one_of(text, edge_text), kids, max_size=4)
    ),
    max_leaves=12,
)
# What replaces one field of a valid body: the nastiest often, anything else too.
edge_values = st.one_of(
    st.sampled_from(NASTY_JSON),
    scalars,
    deep,
    st.sampled_from([[], [None], {"": None}, [[A]], {"default": A}, [A] * 1001]),
    json_values,
)


def encode(body: Any, ascii_only: bool = True) -> bytes:
    """``body`` as JSON bytes: escaped, or raw UTF-8 where it can be (lone surrogates cannot)."""
    try:
        raw = json.dumps(body, ensure_ascii=ascii_only).encode()
    except UnicodeEncodeError:
        raw = json.dumps(body).encode()
    for depth in DEPTHS:
        marker = json.dumps(DEEP.format(depth)).encode()
        if marker in raw:
            lists = b"[" * depth + b"]" * depth
            objects = b'{"a":' * depth + b"1" + b"}" * depth
            raw = raw.replace(marker, lists if depth % 2 else objects)
    return raw


RAW_BODIES = [
    b"",
    b"null",
    b"{",
    b"{not json",
    b"\xff\xfe\x00",
    b'"\\ud800"',
    b'{"a": "\\u0000"}',
    b"NaN",
    b"1" * 5_000,  # past int's string-conversion limit
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    b"[" + b"1," * 1_100_000 + b"1]",  # past MAX_CONTENT_LENGTH
]


@st.composite
def bodies(draw: st.DrawFn, names: list[str]) -> bytes:
    """Random JSON (often an object of the endpoint's own field names), or raw bytes."""
    kind = draw(st.sampled_from(["json", "object", "raw"]))
    if kind == "raw":
        return draw(st.one_of(st.sampled_from(RAW_BODIES), st.binary(max_size=200)))
    if kind == "object" and names:
        value: Any = draw(st.dictionaries(st.sampled_from(names), json_values, max_size=6))
    else:
        value = draw(json_values)
    return encode(value, draw(st.booleans()))


def quoted(value: str | bytes) -> str:
    """Percent-encoded as a broken client would send it (lone surrogates as their bytes)."""
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
    return quote(raw, safe="")


# Path segments: any bytes but "/", percent-encoded.
junk_segment = st.one_of(
    st.sampled_from([*NASTY_SEGMENTS, "a%00", "%E2%80%AE", "%F0%9F%98%80", "%20", "1e999"]),
    st.binary(min_size=1, max_size=120).filter(lambda b: b"/" not in b).map(quoted),
    text.filter(lambda t: bool(t) and "/" not in t).map(quoted),
)
QUERY_NAMES = sorted(
    {k for e in ENDPOINTS for k in valid_request(e).query}
    | {"key", "isDryrun", "isDryRun", "dryRun", "allowMulti", "unknown"}
)
query_value = st.one_of(any_text, st.sampled_from(["true", "false", "0", "-1", "9" * 30]))


@st.composite
def queries(draw: st.DrawFn) -> list[tuple[str, str | bytes]]:
    names = st.one_of(st.sampled_from(QUERY_NAMES), text)
    pairs: list[tuple[str, str | bytes]] = list(
        draw(st.lists(st.tuples(names, query_value), max_size=4))
    )
    if draw(st.booleans()):
        pairs.append((draw(st.sampled_from(QUERY_NAMES)), draw(st.binary(max_size=20))))
    return pairs


# --- requests and the property ----------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request: ``params`` are the (percent-encoded) values put in the rule's path."""

    endpoint: str
    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    query: list[tuple[str, str | bytes]] = field(default_factory=list)
    body: bytes | None = None
    auth: str = "valid"  # valid | none | junk | query | wrong-scheme
    content_type: str = "application/json"


AUTH = ["valid", "none", "junk", "query", "wrong-scheme"]


def method_of(world: World, endpoint: str) -> str:
    methods = set(world.rules[endpoint].methods or ()) - {"HEAD", "OPTIONS"}
    assert len(methods) == 1, (endpoint, methods)
    return methods.pop()


def call_for(world: World, endpoint: str, **changes: Any) -> Call:
    """The valid request of ``endpoint`` on the world's batches, with ``changes`` applied."""
    valid = valid_request(endpoint)
    rule = world.rules[endpoint]
    params = {
        "service_plan_id": world.tenant.id,
        "sub_account_id": world.tenant.id,
        "batch_id": world.batch_id if endpoint.startswith("sinch.") else world.native_id,
        "recipient": A,
        "group_id": world.group_id,
        "provider": "http",
        "callback_id": str(uuid.UUID(int=1)),
        "filename": "openapi.json",
        "name": "swagger-ui.css",
        **changes.pop("params", {}),
    }
    params = {k: v for k, v in params.items() if k in rule.arguments}
    path = rule.rule
    for name, value in params.items():
        path = path.replace(f"<path:{name}>", value).replace(f"<{name}>", value)
    call = Call(
        endpoint=endpoint,
        method=method_of(world, endpoint),
        path=path,
        params=params,
        query=list(valid.query.items()),
        body=None if valid.body is None else encode(valid.body),
    )
    return replace(call, **changes)


def send(world: World, call: Call) -> TestResponse:
    """Make the request, authenticated as ``call.auth`` says."""
    secret = SECRET if call.endpoint == "dlr.receive" else world.tenant.key
    headers = {"Content-Type": call.content_type}
    query = list(call.query)
    if call.auth == "valid":
        headers["Authorization"] = f"Bearer {secret}"
    elif call.auth == "junk":
        headers["Authorization"] = "Bearer \x7f\xff nope"
    elif call.auth == "wrong-scheme":
        headers["Authorization"] = f"Basic {secret}"
    elif call.auth == "query":
        query.append(("key", secret))
    return world.client.open(
        call.path,
        method=call.method,
        query_string="&".join(f"{quoted(k)}={quoted(v)}" for k, v in query),
        data=call.body,
        headers=headers,
    )


def dialect_of(app: Flask, method: str, path: str) -> str:
    """Which error shape answers ``method path``: Sinch's only on a matched Sinch route."""
    try:
        endpoint, _args = app.url_map.bind("localhost").match(
            unquote(path, errors="replace"), method=method
        )
    except HTTPException:
        # Routing errors (404, 405) are answered app-wide in the shape of the path's dialect.
        return "sinch" if unquote(path, errors="replace").startswith("/xms/") else "native"
    return "sinch" if str(endpoint).startswith(("sinch.", "sinch_inbounds.")) else "native"


def assert_well_formed(world: World, call: Call, response: TestResponse) -> None:
    """The property: no 5xx; errors are JSON in the dialect's shape; JSON replies parse."""
    shown = f"{call.method} {call.path[:120]} -> {response.status_code}"
    assert response.status_code < 500, (shown, response.get_data(as_text=True)[:300])
    if response.status_code < 400:
        if response.is_json:
            json.loads(response.get_data())
        return
    assert response.is_json, shown
    body = response.get_json()
    assert isinstance(body, dict), (shown, body)
    if dialect_of(world.app, call.method, call.path) == "sinch":
        assert set(body) == {"code", "text"}, (shown, body)
        assert isinstance(body["code"], str) and body["code"], (shown, body)
        assert isinstance(body["text"], str) and body["text"], (shown, body)
    else:
        assert set(body) == {"code", "message", "errorId", "timestamp"}, (shown, body)
        assert type(body["code"]) is int, (shown, body)
        assert isinstance(body["message"], str) and body["message"], (shown, body)
        uuid.UUID(body["errorId"])
        assert isinstance(body["timestamp"], str) and body["timestamp"], (shown, body)


def snapshot(world: World) -> tuple[Any, ...]:
    """What a refused request must leave as it was: the tenant's rows and its two batches."""
    account = world.tenant.id
    counts = select(
        select(func.count()).where(Batch.account_id == account).scalar_subquery(),
        select(func.count()).where(Recipient.account_id == account).scalar_subquery(),
    )
    with world.sessions() as session:
        rows = session.execute(
            select(Batch.id, Batch.status, Batch.body, Batch.sender, Batch.modified_at)
            .where(Batch.id.in_([world.batch_id, world.native_id]))
            .order_by(Batch.id)
        ).all()
        return (*session.execute(counts).one(), [tuple(r) for r in rows])


def check(world: World, call: Call) -> TestResponse | None:
    """Send ``call`` and assert the property (None: a listed defect, see DEFECTS)."""
    if any(d.covers(world, call) for d in DEFECTS):
        return None
    response = send(world, call)
    assert_well_formed(world, call, response)
    if call.method in ("POST", "PUT", "DELETE"):
        # Nothing else writes during a test: what was stored after the last accepted
        # write is what must still be there after a refused one.
        now = snapshot(world)
        if response.status_code >= 400:
            assert now == world.stored, f"{call.method} {call.path[:120]} wrote, then refused"
        world.stored = now
    return response


# --- known 500s in code this file's authors do not own ---------------------------------------


def _strings(body: bytes | None) -> list[str]:
    """Every string (keys too) in a JSON body; none if it is not JSON."""
    try:
        value = json.loads(body or b"")
    except (ValueError, RecursionError):
        return []
    out: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            out.extend(str(k) for k in item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return out


def _has_surrogate(texts: list[str]) -> bool:
    # json.loads joins an escaped pair into one character: any code unit left is lone.
    return any("\ud800" <= ch <= "\udfff" for t in texts for ch in t)


def _has_nul(texts: list[str]) -> bool:
    return any("\x00" in t for t in texts)


def _segment(call: Call, name: str) -> list[str]:
    return [unquote(call.params.get(name, ""), errors="replace")]


@dataclass(frozen=True)
class Defect:
    """A reported 500: the input that shows it, and the class of inputs it stands for."""

    name: str
    endpoint: str
    databases: frozenset[str]
    reason: str
    example: Callable[[World], Call]
    matches: Callable[[Call], bool]

    def covers(self, world: World, call: Call) -> bool:
        return (
            call.endpoint == self.endpoint
            and world.database in self.databases
            and call.auth in ("valid", "query")
            and self.matches(call)
        )


def _receipt_for_a_sent_message(error: dict[str, str]) -> Callable[[World], Call]:
    """A failure receipt, with ``error``, for a message the carrier accepted."""

    def make(world: World) -> Call:
        start_sending(world.sessions, world.settings, world.native_id)
        mark_sent(world.sessions, world.native_id, [A])
        body = {"id": f"{A}:{world.native_id}", "status": "failed", "error": error}
        return call_for(world, "dlr.receive", body=encode(body))

    return make


BOTH = frozenset({"sqlite", "postgresql"})
POSTGRES = frozenset({"postgresql"})
# Known 500s awaiting a fix elsewhere, each a strict xfail case (none open now).
DEFECTS: list[Defect] = []


@pytest.mark.parametrize("defect", DEFECTS, ids=[d.name for d in DEFECTS])
def test_known_defect_still_fails(
    world: World, defect: Defect, request: pytest.FixtureRequest
) -> None:
    """Each listed input still breaks the property (strict: a fix makes this fail; then
    delete the entry, which also lets the properties try its inputs again). On a
    database it does not affect, the input must already pass."""
    call = defect.example(world)
    affected = world.database in defect.databases
    assert defect.covers(world, call) == affected
    if affected:
        request.applymarker(
            pytest.mark.xfail(strict=True, raises=AssertionError, reason=defect.reason)
        )
    assert_well_formed(world, call, send(world, call))


# --- properties ---------------------------------------------------------------------------


def test_every_route_is_fuzzed(client: FlaskClient) -> None:
    """A new route needs a valid request in valid_request(), or it escapes the fuzzer."""
    assert {rule.endpoint for rule in client.application.url_map.iter_rules()} == set(ENDPOINTS)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@fuzz(12)
@given(data=st.data())
def test_random_requests(world: World, endpoint: str, data: st.DataObject) -> None:
    """Random bodies, query strings, path values and credentials on each route."""
    rule = world.rules[endpoint]
    real = {
        "service_plan_id": [world.tenant.id],
        "sub_account_id": [world.tenant.id],
        "batch_id": [world.batch_id, world.native_id, CLIENT_ID],
        "recipient": [A, "447700900002", quoted(A)],
        "group_id": [world.group_id, "01ARZ3NDEKTSV4RRFFQ69G5FAV"],
        "provider": ["http"],
        "callback_id": [str(uuid.uuid4())],
        "inbound_id": [str(uuid.uuid4())],
        "filename": ["openapi.json", "a/b.txt"],
        "name": ["swagger-ui.css", "dispatcher-init.js", "index.j2"],
    }
    params = {
        name: data.draw(
            st.one_of(st.sampled_from(real[name]), st.sampled_from(real[name]), junk_segment),
            label=name,
        )
        for name in sorted(rule.arguments)
    }
    call = call_for(
        world,
        endpoint,
        params=params,
        query=data.draw(queries(), label="query"),
        body=data.draw(bodies(sorted(keys_of(valid_request(endpoint).body))), label="body"),
        auth=data.draw(st.sampled_from(AUTH), label="auth"),
        content_type=data.draw(
            st.sampled_from(["application/json", "application/json", "text/plain", ""]),
            label="content type",
        ),
    )
    check(world, call)


@pytest.mark.parametrize("endpoint", WITH_BODY)
@fuzz(25)
@given(data=st.data())
def test_valid_bodies_with_one_field_broken(
    world: World, endpoint: str, data: st.DataObject
) -> None:
    """Start from what the endpoint accepts and break exactly one thing in the body."""
    valid = valid_request(endpoint)
    where = data.draw(st.sampled_from(places(valid.body)), label="where")
    op = data.draw(st.sampled_from(["replace", "replace", "replace", "delete", "unknown"]))
    body = mutate(valid.body, where, op, data.draw(edge_values, label="value"))
    check(world, call_for(world, endpoint, body=encode(body, data.draw(st.booleans()))))


@pytest.mark.parametrize("endpoint", WITH_QUERY)
@fuzz(15)
@given(data=st.data())
def test_valid_queries_with_one_parameter_broken(
    world: World, endpoint: str, data: st.DataObject
) -> None:
    """Start from a query string the endpoint accepts and break one parameter."""
    query: dict[str, str | bytes] = dict(valid_request(endpoint).query)
    name = data.draw(st.sampled_from(sorted(query)), label="name")
    op = data.draw(st.sampled_from(["replace", "replace", "delete", "repeat"]))
    value = data.draw(st.one_of(query_value, st.binary(max_size=30)), label="value")
    pairs = list(query.items())
    if op == "delete":
        pairs = [(k, v) for k, v in pairs if k != name]
    elif op == "repeat":
        pairs.append((name, value))
    else:
        pairs = [(k, value if k == name else v) for k, v in pairs]
    check(world, call_for(world, endpoint, query=pairs))


@fuzz(25)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "TRACE", "PROPFIND"]),
    segments=st.lists(st.one_of(st.sampled_from(["batch", "xms", "v1", "batches"]), junk_segment)),
    body=bodies([]),
)
def test_unrouted_requests(world: World, method: str, segments: list[str], body: bytes) -> None:
    """Paths and methods no route has: a 404 or 405 in the native shape, never a 5xx."""
    check(world, Call("", method, "/" + "/".join(segments), body=body))


# --- sweeps: every place with the nastiest values, on every run ------------------------------


def sweep(world: World, calls: list[tuple[str, Call]]) -> None:
    """Run every call; fail once, listing every call that broke the property."""
    failures = []
    for label, call in calls:
        try:
            check(world, call)
        except AssertionError as exc:
            failures.append(f"{label}: {str(exc)[:300]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("endpoint", WITH_BODY)
def test_every_body_field_with_nasty_values(world: World, endpoint: str) -> None:
    valid = valid_request(endpoint)
    calls = [
        (
            f"{op} {where} = {value!r:.20}",
            call_for(world, endpoint, body=encode(mutate(valid.body, where, op, value))),
        )
        for where in places(valid.body)[1:]
        for op, value in [("delete", None)] + [("replace", v) for v in NASTY_JSON]
    ]
    sweep(world, calls)


@pytest.mark.parametrize("endpoint", WITH_QUERY)
def test_every_query_parameter_with_nasty_values(world: World, endpoint: str) -> None:
    valid = valid_request(endpoint)
    calls = [
        (
            f"?{name}={value!r:.20}",
            call_for(
                world,
                endpoint,
                query=[(k, value if k == name else v) for k, v in valid.query.items()],
            ),
        )
        for name in valid.query
        for value in NASTY_QUERY
    ]
    sweep(world, calls)


def test_every_path_segment_with_nasty_values(world: World) -> None:
    calls = [
        (f"{endpoint} <{name}>={value:.20}", call_for(world, endpoint, params={name: value}))
        for endpoint in ENDPOINTS
        for name in sorted(world.rules[endpoint].arguments)
        for value in NASTY_SEGMENTS
    ]
    sweep(world, calls)
