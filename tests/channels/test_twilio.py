"""Twilio as an upstream carrier, against a stand-in of its Messages API on 127.0.0.1.

StatusCallback signatures in these tests are made by the twilio package's own
RequestValidator, so Dispatcher's check is held to Twilio's scheme, not its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from twilio.request_validator import RequestValidator

from dispatcher.channels.base import OutboundMessage, Outcome
from dispatcher.channels.twilio import STATUS_PATH, TwilioProvider, signature
from dispatcher.states import RecipientStatus
from tests.factories import Tenant
from tests.helpers import free_port, wait_for
from tests.helpers.providers import Live, counts
from tests.standins import Reply, Request
from tests.standins.twilio import Twilio, callback, error, status_params

R = RecipientStatus
SID = "AC" + "0123456789abcdef" * 2
TOKEN = "twilio-auth-token-0123456789abcdef"


@pytest.fixture()
def twilio() -> Iterator[Twilio]:
    with Twilio(account_sid=SID, auth_token=TOKEN) as stand_in:
        yield stand_in  # type: ignore[misc]


@pytest.fixture()
def live(live_factory: Callable[..., Live]) -> Live:
    return live_factory(twilio_auth_token=TOKEN)


@pytest.fixture()
def provider(twilio: Twilio, live: Live) -> TwilioProvider:
    return TwilioProvider(
        account_sid=SID,
        auth_token=TOKEN,
        status_callback=f"{live.runtime.settings.public_base_url}{STATUS_PATH}",
        api_url=twilio.url,
        session=requests.Session(),
        timeout=(3, 10),
    )


def message(to: str = "+447700900001", channel: str = "sms") -> OutboundMessage:
    return OutboundMessage(
        recipient_id="r-1", channel=channel, to=to, sender="+15005550006", body="hi"
    )


def test_a_form_encoded_post_with_basic_auth_and_a_status_callback(
    provider: TwilioProvider, twilio: Twilio, live: Live
) -> None:
    result = provider.send(message())
    assert result.outcome is Outcome.ACCEPTED
    assert str(result.provider_message_id).startswith("SM")
    [sent] = twilio.seen
    assert sent.path == f"/2010-04-01/Accounts/{SID}/Messages.json"
    assert sent.headers["content-type"] == "application/x-www-form-urlencoded"
    assert {k: v[0] for k, v in sent.form().items()} == {
        "To": "+447700900001",
        "From": "+15005550006",
        "Body": "hi",
        "StatusCallback": f"{live.url}/providers/twilio/status",
    }


def test_whatsapp_goes_through_whatsapp_addresses(provider: TwilioProvider, twilio: Twilio) -> None:
    assert provider.send(message(channel="whatsapp")).outcome is Outcome.ACCEPTED
    form = twilio.seen[-1].form()
    assert (form["To"], form["From"]) == (["whatsapp:+447700900001"], ["whatsapp:+15005550006"])


def test_wrong_credentials_are_transient_and_the_token_is_never_shown(twilio: Twilio) -> None:
    bad = TwilioProvider(
        account_sid=SID,
        auth_token="wrong-token",
        api_url=twilio.url,
        session=requests.Session(),
        timeout=(3, 10),
    )
    result = bad.send(message())
    assert (result.outcome, result.error_code, result.error_text) == (
        Outcome.TRANSIENT,
        "twilio_20003",
        "Authenticate",
    )


def test_wrong_credentials_tell_the_operator_what_to_check_once_a_minute(
    twilio: Twilio, operator_warnings: Callable[[], list[str]]
) -> None:
    bad = TwilioProvider(
        account_sid=SID,
        auth_token="wrong-token",
        api_url=twilio.url,
        session=requests.Session(),
        timeout=(3, 10),
    )
    for _ in range(3):
        assert bad.send(message()).error_code == "twilio_20003"
    # Before, only an INFO task line counted {'transient': 1}: nothing said why.
    [line] = operator_warnings()
    assert "refused our credentials (twilio_20003: Authenticate)" in line
    assert "check DISPATCHER_TWILIO_ACCOUNT_SID and DISPATCHER_TWILIO_AUTH_TOKEN" in line
    assert "wrong-token" not in line


@pytest.mark.parametrize(("channel", "code"), [("sms", 21606), ("whatsapp", 63007)])
def test_a_sender_twilio_refuses_falls_back_and_tells_the_operator(
    provider: TwilioProvider,
    twilio: Twilio,
    operator_warnings: Callable[[], list[str]],
    channel: str,
    code: int,
) -> None:
    twilio.senders = {"+15005550001"}
    results = [provider.send(message(channel=channel)) for _ in range(2)]
    # Before: a 400 no table named, so every recipient of the batch failed for good.
    assert {(r.outcome, r.error_code) for r in results} == {(Outcome.CHANNEL, f"twilio_{code}")}
    [line] = operator_warnings()
    assert line.startswith("twilio: Twilio refused the sender '")
    assert f"(twilio_{code}: " in line
    assert "DISPATCHER_TWILIO_MESSAGING_SERVICE_SID" in line


def test_an_unreachable_api_names_its_host_to_the_operator(
    operator_warnings: Callable[[], list[str]],
) -> None:
    port = free_port()
    down = TwilioProvider(
        account_sid=SID,
        auth_token=TOKEN,
        api_url=f"http://127.0.0.1:{port}",
        session=requests.Session(),
        timeout=(3, 10),
    )
    result = down.send(message())
    assert (result.outcome, result.error_code) == (Outcome.TRANSIENT, "network")
    [line] = operator_warnings()
    assert line.startswith(f"twilio: no answer from 127.0.0.1:{port} (ConnectionError)")
    assert "retried on DISPATCHER_SEND_RETRY_SCHEDULE" in line


@pytest.mark.parametrize(
    ("reply", "outcome", "code", "retry_after"),
    [
        (
            error(429, 20429, "Too Many Requests", {"Retry-After": "30"}),
            Outcome.TRANSIENT,
            "twilio_20429",
            30.0,
        ),
        (error(503, 20503, "Service unavailable"), Outcome.TRANSIENT, "twilio_20503", None),
        (Reply(502, b"<html>bad gateway</html>"), Outcome.TRANSIENT, "twilio_502", None),
        (
            error(400, 21610, "Attempt to send to unsubscribed recipient"),
            Outcome.RECIPIENT,
            "twilio_21610",
            None,
        ),
        (error(400, 63016, "Outside the allowed window"), Outcome.CHANNEL, "twilio_63016", None),
        (
            error(400, 21408, "Permission to send an SMS has not been enabled"),
            Outcome.CHANNEL,
            "twilio_21408",
            None,
        ),
    ],
)
def test_errors_are_classified_with_code_text_and_retry_after(
    provider: TwilioProvider,
    twilio: Twilio,
    reply: Reply,
    outcome: Outcome,
    code: str,
    retry_after: float | None,
) -> None:
    twilio.errors["+447700900001"] = reply
    result = provider.send(message())
    assert (result.outcome, result.error_code, result.retry_after) == (outcome, code, retry_after)
    if isinstance(reply.body, dict):
        assert result.error_text == reply.body["message"]


def test_an_invalid_number_fails_the_recipient(provider: TwilioProvider) -> None:
    result = provider.send(message(to="+1"))
    assert (result.outcome, result.error_code) == (Outcome.RECIPIENT, "twilio_21211")


def test_a_rate_limited_send_is_retried_no_sooner_than_retry_after(
    live: Live, tenant: Tenant, provider: TwilioProvider, twilio: Twilio
) -> None:
    twilio.errors["+447700900004"] = error(429, 20429, "Too Many Requests", {"Retry-After": "90"})
    batch_id = live.queued_batch(tenant, ["+447700900004"])
    live.send({"sms": provider}, batch_id)
    [rec] = live.recipients(batch_id)
    assert (rec.status, rec.error_code) == (R.QUEUED, "twilio_20429")
    assert rec.next_attempt_at is not None
    assert (rec.next_attempt_at - rec.updated_at).total_seconds() >= 89


def test_whatsapp_outside_the_window_falls_back_to_sms_within_the_same_send(
    live: Live, tenant: Tenant, provider: TwilioProvider, twilio: Twilio
) -> None:
    twilio.errors["whatsapp:+447700900005"] = error(400, 63016, "Outside the allowed window")
    batch_id = live.queued_batch(
        tenant, ["+447700900005"], channel="whatsapp", fallback_channels=["sms"]
    )
    live.send({"whatsapp": provider, "sms": provider}, batch_id)
    [rec] = live.recipients(batch_id)
    assert (rec.status, rec.channel) == (R.SENT, "sms")
    assert [a[:2] for a in live.attempts(rec.id)] == [("whatsapp", "channel"), ("sms", "accepted")]


# --- the StatusCallback ---------------------------------------------------------------


def hook(live: Live) -> str:
    return f"{live.url}/providers/twilio/status"


def sent_sms(live: Live, tenant: Tenant, provider: TwilioProvider, count: int = 1) -> Any:
    batch_id = live.queued_batch(tenant, [f"+4477009001{i:02d}" for i in range(count)])
    live.send({"sms": provider}, batch_id)
    rows = live.recipients(batch_id)
    assert all(r.status == R.SENT for r in rows)
    return rows


def test_our_signature_is_twilios(live: Live) -> None:
    url = "https://dispatcher.example.com/providers/twilio/status?x=1"
    params = {"MessageSid": "SM1", "MessageStatus": "delivered", "Body": "héllo wörld", "A": ""}
    expected = RequestValidator(TOKEN).compute_signature(url, params)
    assert signature(TOKEN, url, params.items()) == expected
    assert RequestValidator(TOKEN).validate(url, params, signature(TOKEN, url, params.items()))


def test_statuses_are_mapped_and_failures_keep_their_code(
    live: Live, tenant: Tenant, provider: TwilioProvider
) -> None:
    delivered, undelivered = sent_sms(live, tenant, provider, count=2)
    for rec, state, code in (
        (delivered, "sent", None),
        (delivered, "delivered", None),
        (undelivered, "undelivered", "30003"),
    ):
        params = status_params(rec.provider_message_id, state, account_sid=SID, error_code=code)
        reply = callback(hook(live), params, auth_token=TOKEN)
        assert reply.status_code == 200, reply.text
    delivered, undelivered = live.recipients(delivered.batch_id)
    assert delivered.status == R.DELIVERED
    assert (undelivered.status, undelivered.error_code) == (R.FAILED, "twilio_30003")
    assert live.events(undelivered.id)[-1] == "failed"
    assert "message.delivered" in live.callbacks(delivered.id)


def test_duplicate_and_out_of_order_callbacks_change_nothing(
    live: Live, tenant: Tenant, provider: TwilioProvider
) -> None:
    [rec] = sent_sms(live, tenant, provider)
    ref = rec.provider_message_id
    first = callback(hook(live), status_params(ref, "delivered", account_sid=SID), auth_token=TOKEN)
    assert counts(first) == (1, 0)
    before = live.events(rec.id)
    for state, code in (("delivered", None), ("sent", None), ("failed", "30008"), ("queued", None)):
        reply = callback(
            hook(live),
            status_params(ref, state, account_sid=SID, error_code=code),
            auth_token=TOKEN,
        )
        assert reply.status_code == 200 and reply.json()["applied"] == 0
    assert live.recipients(rec.batch_id)[0].status == R.DELIVERED
    assert live.events(rec.id) == before


@pytest.mark.parametrize("case", ["missing", "other token", "other url", "tampered"])
def test_a_bad_signature_is_401_and_changes_nothing(
    live: Live, tenant: Tenant, provider: TwilioProvider, case: str
) -> None:
    [rec] = sent_sms(live, tenant, provider)
    params = status_params(rec.provider_message_id, "delivered", account_sid=SID)
    good = RequestValidator(TOKEN).compute_signature(hook(live), params)
    sig = {
        "missing": "",
        "other token": RequestValidator("not-the-token").compute_signature(hook(live), params),
        "other url": RequestValidator(TOKEN).compute_signature("https://elsewhere/x", params),
        "tampered": good,
    }[case]
    if case == "tampered":
        params = {**params, "MessageStatus": "undelivered"}
    before = live.events(rec.id)
    reply = callback(hook(live), params, auth_token=TOKEN, signature=sig)
    assert reply.status_code == 401
    assert TOKEN not in reply.text
    assert live.recipients(rec.batch_id)[0].status == R.SENT
    assert live.events(rec.id) == before


def test_without_an_auth_token_there_is_no_callback_endpoint(
    live_factory: Callable[..., Live],
) -> None:
    bare = live_factory()
    reply = callback(f"{bare.url}/providers/twilio/status", {"MessageSid": "SM1"}, auth_token="x")
    assert reply.status_code == 404


def test_a_callback_that_arrives_before_the_send_returns_is_applied(
    live: Live, tenant: Tenant, provider: TwilioProvider, twilio: Twilio
) -> None:
    answers: list[dict[str, int]] = []

    def deliver_first(request: Request, reply: Reply) -> None:
        params = status_params(reply.body["sid"], "delivered", account_sid=SID)
        answers.append(callback(hook(live), params, auth_token=TOKEN).json())

    twilio.before_reply = deliver_first
    batch_id = live.queued_batch(tenant, ["+447700900001"])
    live.send({"sms": provider}, batch_id)
    assert answers == [{"applied": 0, "pending": 1, "ignored": 0}]
    wait_for(lambda: live.recipients(batch_id)[0].status == R.DELIVERED, timeout=3)
    # Matched by (provider, id): the provider's name is what the send recorded.
    assert live.recipients(batch_id)[0].provider == "twilio"


@pytest.mark.parametrize(
    ("code", "channel_left"), [("63016", True), ("63003", True), ("63016", False)]
)
def test_a_whatsapp_channel_error_in_a_status_callback_falls_back_to_sms(
    live: Live,
    tenant: Tenant,
    provider: TwilioProvider,
    twilio: Twilio,
    code: str,
    channel_left: bool,
) -> None:
    fallback = ["sms"] if channel_left else []
    batch_id = live.queued_batch(
        tenant, ["+447700900006"], channel="whatsapp", fallback_channels=fallback
    )
    live.send({"whatsapp": provider, "sms": provider}, batch_id)
    [rec] = live.recipients(batch_id)
    assert (rec.status, rec.channel) == (R.SENT, "whatsapp")
    params = status_params(rec.provider_message_id, "undelivered", account_sid=SID, error_code=code)
    assert counts(callback(hook(live), params, auth_token=TOKEN)) == (1, 0)
    # Twilio repeats a callback it thinks was lost: nothing more happens.
    assert counts(callback(hook(live), params, auth_token=TOKEN)) == (0, 1)
    live.send({"whatsapp": provider, "sms": provider}, batch_id)
    [rec] = live.recipients(batch_id)
    if not channel_left:
        assert (rec.status, rec.channel, rec.error_code) == (R.FAILED, "whatsapp", f"twilio_{code}")
        assert len(twilio.seen) == 1
        return
    assert (rec.status, rec.channel) == (R.SENT, "sms")
    assert [r.form()["To"] for r in twilio.seen] == [["whatsapp:+447700900006"], ["+447700900006"]]
    assert live.events(rec.id)[-3:] == ["sent", "queued", "sent"]
