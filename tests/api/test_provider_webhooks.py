"""The vendor status webhooks refuse what an unauthenticated caller sends with a 4xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient

from api.app import create_app
from dispatcher.config import Settings
from dispatcher.runtime import Runtime
from tests.helpers import RecordingPublisher

CLIENT_TOKEN = "rbm-client-token-0123456789"
EVENTS = "/providers/rbm/events"


@pytest.fixture()
def vendors(settings: Settings) -> Iterator[FlaskClient]:
    """The API with the RBM webhook configured."""
    rt = Runtime(settings.replace(rbm_client_token=CLIENT_TOKEN), RecordingPublisher())
    try:
        yield create_app(rt.settings, runtime=rt).test_client()
    finally:
        rt.dispose()


def verification(token: str, secret: str) -> bytes:
    """A console verification body from two JSON fragments (escapes kept as written)."""
    return f'{{"clientToken": {token}, "secret": {secret}}}'.encode()


@pytest.mark.parametrize(
    "body",
    [
        verification('"\\ud800"', '"12345"'),
        verification('["rbm"]', '"12345"'),
        verification(f'"{CLIENT_TOKEN}"', '"\\udfff"'),
        verification(f'"{CLIENT_TOKEN}"', '{"a": 1}'),
        verification(f'"{CLIENT_TOKEN}"', '"a\\u0000b"'),
    ],
)
def test_a_verification_with_a_broken_token_or_secret_is_4xx(
    vendors: FlaskClient, body: bytes
) -> None:
    reply = vendors.post(EVENTS, data=body, content_type="application/json")
    assert reply.status_code in (400, 401), reply.get_data(as_text=True)
    assert CLIENT_TOKEN not in reply.get_data(as_text=True)


def test_the_verification_echoes_a_string_secret(vendors: FlaskClient) -> None:
    body = {"clientToken": CLIENT_TOKEN, "secret": "12345"}
    reply = vendors.post(EVENTS, json=body)
    assert (reply.status_code, reply.get_data(as_text=True)) == (200, "12345")
    assert vendors.post(EVENTS, json={**body, "clientToken": "nope"}).status_code == 401
