"""The shared classification helpers: Retry-After in both of its forms, the fallbacks, and
which webhook failures are a channel's (late fallback) and which the recipient's."""

from __future__ import annotations

import email.utils
import socket
from collections.abc import Iterator

import pytest
import requests

from dispatcher.channels import twilio, whatsapp_cloud
from dispatcher.channels.base import CHANNEL_FAILED, Outcome, Receipt
from dispatcher.channels.errors import (
    MAX_RETRY_AFTER,
    by_status,
    classify,
    failure,
    late_failure,
    may_have_arrived,
    network,
    retry_after,
    too_long,
)
from tests.helpers.mute import MuteApi

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30", 30.0),
        ("0.5", 0.5),
        ("-5", 0.0),
        ("99999999", MAX_RETRY_AFTER),
        (email.utils.formatdate(NOW + 120, usegmt=True), 120.0),
        (email.utils.formatdate(NOW - 120, usegmt=True), 0.0),
        ("nan", None),
        ("soon", None),
        ("", None),
    ],
)
def test_retry_after_takes_seconds_or_an_http_date(value: str, seconds: float | None) -> None:
    assert retry_after({"Retry-After": value}, now=NOW) == seconds


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.ACCEPTED),
        (401, Outcome.TRANSIENT),
        (403, Outcome.TRANSIENT),
        (408, Outcome.TRANSIENT),
        (429, Outcome.TRANSIENT),
        (500, Outcome.TRANSIENT),
        (400, Outcome.RECIPIENT),
        (404, Outcome.RECIPIENT),
    ],
)
def test_an_unnamed_answer_is_decided_by_its_status(status: int, outcome: Outcome) -> None:
    assert by_status(status) is outcome


def test_a_named_code_wins_over_the_status() -> None:
    table = {131047: Outcome.CHANNEL}
    assert classify(table, 131047, 400) is Outcome.CHANNEL
    assert classify(table, 1, 400) is Outcome.RECIPIENT
    assert classify(table, None, 503) is Outcome.TRANSIENT


def test_code_and_text_are_cut_to_their_columns() -> None:
    result = failure(Outcome.RECIPIENT, code="x" * 40, text="y" * 600)
    assert len(result.error_code or "") == 32 and len(result.error_text or "") == 500
    assert failure(Outcome.RECIPIENT, code="c", text="").error_text is None


def test_a_late_failure_is_a_channel_failure_only_for_a_channel_code() -> None:
    channel = late_failure("m" * 120, Outcome.CHANNEL, code="c" * 40, text="t" * 600)
    assert channel.status == CHANNEL_FAILED
    assert (len(channel.provider_message_id), len(channel.error_code or "")) == (100, 32)
    assert len(channel.error_text or "") == 500
    for outcome in (Outcome.RECIPIENT, Outcome.TRANSIENT, None):
        assert late_failure("m", outcome, code="c", text="").status == "failed"
    assert late_failure("m", None, code="c", text="").error_text is None


def test_text_over_a_limit_is_a_channel_refusal() -> None:
    assert too_long("x" * 10, limit=10, code="c", service="S") is None
    refused = too_long("x" * 11, limit=10, code="c", service="S")
    assert refused is not None and refused.outcome is Outcome.CHANNEL
    assert refused.error_text == "S text messages hold at most 10 characters"


@pytest.mark.parametrize(
    ("form", "receipt"),
    [
        ({"MessageStatus": "read"}, Receipt("SM1", "read")),
        ({"MessageStatus": "delivered"}, Receipt("SM1", "delivered")),
        (
            {"MessageStatus": "undelivered", "ErrorCode": "63016"},
            ("channel_failed", "twilio_63016"),
        ),
        ({"MessageStatus": "failed", "ErrorCode": "63003"}, ("channel_failed", "twilio_63003")),
        ({"MessageStatus": "undelivered", "ErrorCode": "30003"}, ("failed", "twilio_30003")),
        ({"MessageStatus": "failed"}, ("failed", "twilio_failed")),
        ({"MessageStatus": "sent"}, None),
    ],
)
def test_twilio_statuses_become_receipts(form: dict[str, str], receipt: object) -> None:
    got = twilio.receipt_from_callback({"MessageSid": "SM1", **form})
    if isinstance(receipt, tuple):
        assert got is not None and (got.status, got.error_code) == receipt
    else:
        assert got == receipt


@pytest.mark.parametrize(
    ("code", "status"), [(131026, "channel_failed"), (131047, "channel_failed"), (131021, "failed")]
)
def test_whatsapp_failed_statuses_fall_back_only_for_channel_codes(code: int, status: str) -> None:
    item = {"id": "wamid.1", "status": "failed", "errors": [{"code": code, "title": "t"}]}
    body = {"entry": [{"changes": [{"value": {"statuses": [item]}}]}]}
    [receipt] = whatsapp_cloud.receipts_from_notification(body)
    assert (receipt.status, receipt.error_code, receipt.error_text) == (
        status,
        f"whatsapp_{code}",
        "t",
    )


@pytest.fixture(params=["closes", "silent"])
def took_it(request: pytest.FixtureRequest) -> Iterator[MuteApi]:
    """An API that read the request and gave no answer: it may have acted on it."""
    server = MuteApi(close_after_request=request.param == "closes")
    yield server
    server.close()


def post_error(url: str) -> requests.RequestException:
    try:
        requests.post(url, data="{}", timeout=(1, 0.3))
    except requests.RequestException as exc:
        return exc
    raise AssertionError("the POST was answered")


def test_an_unanswered_request_may_have_arrived_a_connection_never_made_did_not(
    took_it: MuteApi,
) -> None:
    assert may_have_arrived(post_error(took_it.url + "/messages"))
    with socket.create_server(("127.0.0.1", 0)) as s:
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/"
    assert not may_have_arrived(post_error(closed))
    assert not may_have_arrived(requests.exceptions.InvalidURL("no host"))


def test_an_unanswered_request_is_unknown_unless_a_resend_is_harmless(took_it: MuteApi) -> None:
    exc = post_error(took_it.url + "/messages")
    lost = network(exc, provider="twilio")
    assert (lost.outcome, lost.error_code) == (Outcome.UNKNOWN, "outcome_unknown")
    # RBM: the same messageId sent again is refused as ALREADY_EXISTS.
    again = network(exc, provider="rbm", resend_safe=True)
    assert (again.outcome, again.error_code) == (Outcome.TRANSIENT, "network")
