"""The vendor status webhooks: what a caller sends, signed or not, is never a 500.

Twilio's callbacks are signed with Twilio's own RequestValidator (the vendor's SDK).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from flask.testing import FlaskClient
from twilio.request_validator import RequestValidator

from api.app import create_app
from dispatcher.config import Settings
from dispatcher.runtime import Runtime
from tests.helpers import RecordingPublisher

CLIENT_TOKEN = "rbm-client-token-0123456789"
EVENTS = "/providers/rbm/events"
TWILIO_TOKEN = "twilio-auth-token-0123456789"
PUBLIC = "https://api.example.com"
STATUS = "/providers/twilio/status"


@pytest.fixture()
def vendors(settings: Settings) -> Iterator[FlaskClient]:
    """The API with the RBM and Twilio webhooks configured."""
    rt = Runtime(
        settings.replace(
            rbm_client_token=CLIENT_TOKEN, twilio_auth_token=TWILIO_TOKEN, public_base_url=PUBLIC
        ),
        RecordingPublisher(),
    )
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


def twilio_status(vendors: FlaskClient, params: dict[str, str]) -> int:
    """POST a StatusCallback signed by Twilio's own validator; the reply's status."""
    signature = RequestValidator(TWILIO_TOKEN).compute_signature(PUBLIC + STATUS, params)
    reply = vendors.post(STATUS, data=params, headers={"X-Twilio-Signature": signature})
    return reply.status_code


def test_a_signed_failure_with_a_numeric_error_code_is_recorded(vendors: FlaskClient) -> None:
    failed = {"MessageSid": "SMunknown1", "MessageStatus": "failed", "ErrorCode": "30003"}
    assert twilio_status(vendors, failed) == 200


@pytest.mark.parametrize("code", ["\u00b2", "9" * 5000])
def test_a_signed_failure_with_a_strange_error_code_is_not_a_500(
    vendors: FlaskClient, code: str
) -> None:
    failed = {"MessageSid": "SMunknown2", "MessageStatus": "failed", "ErrorCode": code}
    assert twilio_status(vendors, failed) < 500


def test_a_refused_status_webhook_tells_the_operator_what_to_check(
    vendors: FlaskClient, operator_warnings: Callable[[], list[str]]
) -> None:
    """A wrong secret (or, for Twilio, public URL) leaves every message ``sent`` until the
    receipt deadline; the 401 alone shows only in the access log. Once a minute per
    provider, never the secret."""
    signed_elsewhere = RequestValidator(TWILIO_TOKEN).compute_signature(
        "https://proxy.example.com" + STATUS, {"MessageSid": "SM1", "MessageStatus": "sent"}
    )
    for _ in range(2):
        reply = vendors.post(
            STATUS,
            data={"MessageSid": "SM1", "MessageStatus": "sent"},
            headers={"X-Twilio-Signature": signed_elsewhere},
        )
        assert reply.status_code == 401
    assert vendors.post(EVENTS, json={"clientToken": "nope", "secret": "1"}).status_code == 401
    twilio_line, rbm_line = operator_warnings()
    assert twilio_line.startswith("twilio: refused a status webhook with a missing or wrong")
    assert "DISPATCHER_TWILIO_AUTH_TOKEN" in twilio_line
    assert f"checked as '{PUBLIC}{STATUS}'" in twilio_line
    assert rbm_line.endswith("check DISPATCHER_RBM_CLIENT_TOKEN.")
    assert not any(TWILIO_TOKEN in line or CLIENT_TOKEN in line for line in operator_warnings())
