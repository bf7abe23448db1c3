"""RCS through Google RBM, against a stand-in of RBM and its token endpoint on 127.0.0.1."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from dispatcher.channels.base import Lookup, OutboundMessage, Outcome
from dispatcher.channels.rbm import MAX_TEXT, RbmProvider, ServiceAccountTokens
from dispatcher.channels.simulator import Simulator
from dispatcher.states import RecipientStatus
from tests.factories import Tenant
from tests.helpers import wait_for
from tests.helpers.mute import MuteApi
from tests.helpers.providers import Live, counts
from tests.standins import Reply, Request
from tests.standins.rbm import Rbm, event, push, write_key_file

R = RecipientStatus
CLIENT_TOKEN = "rbm-client-token-0123456789"
AGENT = "dispatcher-agent@rbm.goog"


class Clock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture()
def rbm(private_key: rsa.RSAPrivateKey) -> Iterator[Rbm]:
    with Rbm(public_key=private_key.public_key()) as stand_in:
        yield stand_in  # type: ignore[misc]


@pytest.fixture()
def key_file(tmp_path: Path, rbm: Rbm, private_key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / "rbm-key.json"
    write_key_file(path, private_key, rbm.token_uri)
    return path


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def provider(rbm: Rbm, key_file: Path, clock: Clock) -> RbmProvider:
    session = requests.Session()
    tokens = ServiceAccountTokens.from_file(
        str(key_file), session=session, timeout=(3, 10), clock=clock
    )
    return RbmProvider(
        agent_id=AGENT, tokens=tokens, api_url=rbm.url, session=session, timeout=(3, 10)
    )


@pytest.fixture()
def live(live_factory: Callable[..., Live]) -> Live:
    return live_factory(rbm_client_token=CLIENT_TOKEN)


def message(to: str = "+447700900001", body: str = "hi", rid: str = "r-1") -> OutboundMessage:
    return OutboundMessage(recipient_id=rid, channel="rcs", to=to, sender="Acme", body=body)


def test_an_agent_message_carries_the_recipient_id_and_a_service_account_token(
    provider: RbmProvider, rbm: Rbm
) -> None:
    result = provider.send(message(rid="rec-42"))
    assert result.outcome is Outcome.ACCEPTED
    assert result.provider_message_id == "rec-42"
    [sent] = rbm.requests_to("/agentMessages")
    assert sent.path == "/v1/phones/+447700900001/agentMessages"
    assert sent.query == {"messageId": ["rec-42"], "agentId": [AGENT]}
    assert sent.json() == {"contentMessage": {"text": "hi"}}
    assert sent.headers["authorization"] == "Bearer ya29.stand-in-1"


def test_a_repeated_hand_off_is_the_same_acceptance(provider: RbmProvider, rbm: Rbm) -> None:
    first = provider.send(message(rid="rec-7"))
    again = provider.send(message(rid="rec-7"))
    assert (first.outcome, again.outcome) == (Outcome.ACCEPTED, Outcome.ACCEPTED)
    assert again.provider_message_id == "rec-7"
    assert len(rbm.accepted) == 1
    # So a hand-off a lost worker may have made is made again (reclaim's answer).
    assert provider.lookup(message(rid="rec-7")) == (Lookup.NOT_FOUND, None)


def test_a_hand_off_left_unanswered_is_sent_again(rbm: Rbm, key_file: Path, clock: Clock) -> None:
    """RBM may have taken a message whose answer was lost; sending it again is harmless
    (the same messageId is ALREADY_EXISTS), so it is retried, where Twilio's or
    WhatsApp's would end unknown."""
    api = MuteApi(close_after_request=True)
    session = requests.Session()
    tokens = ServiceAccountTokens.from_file(
        str(key_file), session=session, timeout=(3, 10), clock=clock
    )
    try:
        dropped = RbmProvider(
            agent_id=AGENT, tokens=tokens, api_url=api.url, session=session, timeout=(3, 10)
        ).send(message())
    finally:
        api.close()
    assert (dropped.outcome, dropped.error_code) == (Outcome.TRANSIENT, "network")
    assert len(api.accepted) == 1


def test_the_token_is_cached_and_refreshed_before_it_expires(
    provider: RbmProvider, rbm: Rbm, clock: Clock
) -> None:
    for i in range(3):
        assert provider.send(message(rid=f"a{i}")).outcome is Outcome.ACCEPTED
    assert len(rbm.requests_to("/token")) == 1
    clock.now += 3600 - 299  # inside the refresh margin, the token not yet expired
    assert provider.send(message(rid="b")).outcome is Outcome.ACCEPTED
    assert len(rbm.requests_to("/token")) == 2
    assert rbm.requests_to("/agentMessages")[-1].headers["authorization"].endswith("-2")


def test_a_token_refused_early_is_replaced_within_the_same_send(
    provider: RbmProvider, rbm: Rbm
) -> None:
    assert provider.send(message(rid="a")).outcome is Outcome.ACCEPTED
    rbm.revoke_tokens()
    result = provider.send(message(rid="b"))
    assert result.outcome is Outcome.ACCEPTED
    assert len(rbm.requests_to("/token")) == 2


def test_a_broken_key_is_transient_and_its_content_is_never_shown(
    rbm: Rbm, tmp_path: Path, private_key: rsa.RSAPrivateKey
) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = other.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    key = {"client_email": "x@y", "private_key": pem, "token_uri": rbm.token_uri}
    session = requests.Session()
    tokens = ServiceAccountTokens(key=key, session=session, timeout=(3, 10))
    result = RbmProvider(
        agent_id=AGENT, tokens=tokens, api_url=rbm.url, session=session, timeout=(3, 10)
    ).send(message())
    assert result.outcome is Outcome.TRANSIENT
    assert result.error_code == "rbm_auth"
    assert "PRIVATE KEY" not in (result.error_text or "")
    # The token endpoint's OAuth error says why (before: only "answered 400").
    assert result.error_text == "token endpoint answered 400 (invalid_grant: Invalid JWT)"


def test_a_token_endpoint_outage_is_not_called_a_refused_key(
    rbm: Rbm, provider: RbmProvider, operator_warnings: Callable[[], list[str]]
) -> None:
    rbm.token_down = (503, "backendError")
    result = provider.send(message())
    assert (result.outcome, result.error_code) == (Outcome.TRANSIENT, "rbm_auth")
    assert result.error_text == "token endpoint answered 503 (backendError: Try again later.)"
    [line] = operator_warnings()
    assert line.startswith("rbm: token endpoint answered 503 (backendError")
    assert "refused our credentials" not in line
    rbm.token_down = None
    assert provider.send(message(rid="r-2")).outcome is Outcome.ACCEPTED


def test_a_refused_key_tells_the_operator_which_setting_to_check(
    rbm: Rbm, operator_warnings: Callable[[], list[str]]
) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = other.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    key = {"client_email": "x@y", "private_key": pem, "token_uri": rbm.token_uri}
    session = requests.Session()
    tokens = ServiceAccountTokens(key=key, session=session, timeout=(3, 10))
    provider = RbmProvider(
        agent_id=AGENT, tokens=tokens, api_url=rbm.url, session=session, timeout=(3, 10)
    )
    provider.send(message())
    provider.send(message())
    [line] = operator_warnings()
    assert line.startswith("rbm: the API refused our credentials (rbm_auth: token endpoint")
    assert "check DISPATCHER_RBM_SERVICE_ACCOUNT_FILE" in line
    assert "PRIVATE KEY" not in line


@pytest.mark.parametrize(
    ("status", "rpc", "after", "outcome", "retry_after"),
    [
        (429, "RESOURCE_EXHAUSTED", "7", Outcome.TRANSIENT, 7.0),
        (503, "UNAVAILABLE", None, Outcome.TRANSIENT, None),
        (403, "PERMISSION_DENIED", None, Outcome.CHANNEL, None),
        (400, "INVALID_ARGUMENT", None, Outcome.RECIPIENT, None),
    ],
)
def test_refusals_are_classified_with_code_text_and_retry_after(
    provider: RbmProvider,
    rbm: Rbm,
    status: int,
    rpc: str,
    after: str | None,
    outcome: Outcome,
    retry_after: float | None,
) -> None:
    rbm.refuse["+447700900001"] = (status, rpc, after)
    result = provider.send(message())
    assert result.outcome is outcome
    assert result.error_code == f"rbm_{status}_{rpc}"
    assert result.error_text == f"refused: {rpc}"
    assert result.retry_after == retry_after


def test_text_over_the_rbm_limit_is_refused_for_rcs_without_a_call(
    provider: RbmProvider, rbm: Rbm
) -> None:
    result = provider.send(message(body="x" * (MAX_TEXT + 1)))
    assert result.outcome is Outcome.CHANNEL
    assert result.error_code == "rbm_text_too_long"
    assert rbm.requests_to("/agentMessages") == []
    assert provider.send(message(body="x" * MAX_TEXT)).outcome is Outcome.ACCEPTED


def test_not_rcs_capable_falls_back_to_sms_within_the_same_send(
    live: Live, tenant: Tenant, provider: RbmProvider, rbm: Rbm
) -> None:
    rbm.not_capable.add("+447700900002")
    batch_id = live.queued_batch(
        tenant, ["+447700900001", "+447700900002"], channel="rcs", fallback_channels=["sms"]
    )
    sms = Simulator(redis_client=live.runtime.redis, rules={})
    report = live.send({"rcs": provider, "sms": sms}, batch_id)
    capable, not_capable = live.recipients(batch_id)
    assert (capable.status, capable.channel) == (R.SENT, "rcs")
    assert capable.provider_message_id == capable.id
    assert (not_capable.status, not_capable.channel) == (R.SENT, "sms")
    assert [a[:2] for a in live.attempts(not_capable.id)] == [
        ("rcs", "channel"),
        ("sms", "accepted"),
    ]
    assert report.claimed == 3


def test_a_rate_limited_send_waits_at_least_retry_after(
    live: Live, tenant: Tenant, provider: RbmProvider, rbm: Rbm
) -> None:
    rbm.refuse["+447700900003"] = (429, "RESOURCE_EXHAUSTED", "120")
    batch_id = live.queued_batch(tenant, ["+447700900003"], channel="rcs")
    live.send({"rcs": provider}, batch_id)
    [rec] = live.recipients(batch_id)
    assert rec.status == R.QUEUED and rec.channel == "rcs"
    assert rec.next_attempt_at is not None
    assert (rec.next_attempt_at - rec.updated_at).total_seconds() >= 119
    assert rec.error_code == "rbm_429_RESOURCE_EXHAUSTED"


# --- the events webhook -------------------------------------------------------------


def sent_rcs(live: Live, tenant: Tenant, provider: RbmProvider) -> Any:
    batch_id = live.queued_batch(tenant, ["+447700900001"], channel="rcs")
    live.send({"rcs": provider}, batch_id)
    [rec] = live.recipients(batch_id)
    assert rec.status == R.SENT
    return rec


def hook(live: Live) -> str:
    return f"{live.url}/providers/rbm/events"


def test_the_console_verification_is_answered_with_the_secret(live: Live) -> None:
    reply = requests.post(
        hook(live), json={"clientToken": CLIENT_TOKEN, "secret": "12345"}, timeout=10
    )
    assert (reply.status_code, reply.text) == (200, "12345")
    wrong = requests.post(hook(live), json={"clientToken": "nope", "secret": "12345"}, timeout=10)
    assert wrong.status_code == 401 and "12345" not in wrong.text


def test_delivered_then_read_are_applied_with_events_and_callbacks(
    live: Live, tenant: Tenant, provider: RbmProvider
) -> None:
    rec = sent_rcs(live, tenant, provider)
    reply = push(hook(live), event("DELIVERED", rec.id), client_token=CLIENT_TOKEN)
    assert counts(reply) == (1, 0)
    reply = push(hook(live), event("READ", rec.id), client_token=CLIENT_TOKEN)
    assert counts(reply) == (1, 0)
    assert live.recipients(rec.batch_id)[0].status == R.READ
    assert live.events(rec.id)[-2:] == ["delivered", "read"]
    assert "message.read" in live.callbacks(rec.id)


def test_duplicate_and_out_of_order_events_change_nothing(
    live: Live, tenant: Tenant, provider: RbmProvider
) -> None:
    rec = sent_rcs(live, tenant, provider)
    assert push(hook(live), event("READ", rec.id), client_token=CLIENT_TOKEN).json()["applied"] == 1
    before = live.events(rec.id)
    for kind in ("READ", "DELIVERED", "IS_TYPING"):
        reply = push(hook(live), event(kind, rec.id), client_token=CLIENT_TOKEN)
        assert reply.status_code == 200 and reply.json()["applied"] == 0
    assert live.recipients(rec.batch_id)[0].status == R.READ
    assert live.events(rec.id) == before


@pytest.mark.parametrize("signature", ["", "bm90LXRoZS1zaWduYXR1cmU="])
def test_a_bad_signature_is_401_and_changes_nothing(
    live: Live, tenant: Tenant, provider: RbmProvider, signature: str
) -> None:
    rec = sent_rcs(live, tenant, provider)
    before = live.events(rec.id)
    reply = push(
        hook(live), event("DELIVERED", rec.id), client_token=CLIENT_TOKEN, signature=signature
    )
    assert reply.status_code == 401
    assert CLIENT_TOKEN not in reply.text
    assert live.recipients(rec.batch_id)[0].status == R.SENT
    assert live.events(rec.id) == before


@pytest.mark.parametrize(
    "body",
    [{"message": {}}, {"message": {"data": "***"}}, {"message": {"data": "bm90IGpzb24="}}, []],
)
def test_malformed_pushes_are_4xx(live: Live, body: Any) -> None:
    reply = requests.post(hook(live), json=body, headers={"X-Goog-Signature": "x"}, timeout=10)
    assert 400 <= reply.status_code < 500


def test_no_client_token_configured_means_no_webhook(live_factory: Callable[..., Live]) -> None:
    bare = live_factory()
    reply = push(f"{bare.url}/providers/rbm/events", event("READ", "x"), client_token="")
    assert reply.status_code == 404


def test_an_event_that_arrives_before_the_send_returns_is_applied(
    live: Live, tenant: Tenant, provider: RbmProvider, rbm: Rbm
) -> None:
    answers: list[tuple[int, dict[str, int]]] = []

    def deliver_first(request: Request, reply: Reply) -> None:
        rid = request.query["messageId"][0]
        answer = push(hook(live), event("DELIVERED", rid), client_token=CLIENT_TOKEN)
        answers.append((answer.status_code, answer.json()))

    rbm.before_reply = deliver_first
    batch_id = live.queued_batch(tenant, ["+447700900001"], channel="rcs")
    live.send({"rcs": provider}, batch_id)
    # Kept while the send was in flight, then applied with its outcome.
    assert answers == [(200, {"applied": 0, "pending": 1, "ignored": 0})]
    wait_for(lambda: live.recipients(batch_id)[0].status == R.DELIVERED, timeout=3)
    # Matched by (provider, id): the provider's name is what the send recorded.
    assert live.recipients(batch_id)[0].provider == "rbm"


def test_a_ttl_asks_rbm_to_revoke_an_undelivered_message(rbm: Rbm, provider: RbmProvider) -> None:
    provider.ttl = 600.0
    assert provider.send(message(rid="rec-ttl")).outcome is Outcome.ACCEPTED
    assert rbm.requests_to("/agentMessages")[-1].json() == {
        "contentMessage": {"text": "hi"},
        "ttl": "600s",
    }


def test_a_message_revoked_after_its_ttl_falls_back_to_sms(
    live: Live, tenant: Tenant, provider: RbmProvider
) -> None:
    batch_id = live.queued_batch(
        tenant, ["+447700900001"], channel="rcs", fallback_channels=["sms"]
    )
    sms = Simulator(redis_client=live.runtime.redis, rules={})
    live.send({"rcs": provider, "sms": sms}, batch_id)
    [rec] = live.recipients(batch_id)
    assert (rec.status, rec.channel) == (R.SENT, "rcs")
    reply = push(hook(live), event("TTL_EXPIRATION_REVOKED", rec.id), client_token=CLIENT_TOKEN)
    assert counts(reply) == (1, 0)
    [rec] = live.recipients(batch_id)
    assert (rec.status, rec.channel, rec.error_code) == (R.QUEUED, "sms", "rbm_ttl_revoked")
    # A delivery report for the revoked message, or the revocation again: nothing moves.
    for kind in ("DELIVERED", "TTL_EXPIRATION_REVOKED"):
        assert counts(push(hook(live), event(kind, rec.id), client_token=CLIENT_TOKEN)) == (0, 1)
    live.send({"rcs": provider, "sms": sms}, batch_id)
    [rec] = live.recipients(batch_id)
    assert (rec.status, rec.channel) == (R.SENT, "sms")
    assert [a[:2] for a in live.attempts(rec.id)] == [
        ("rcs", "accepted"),
        ("rcs", "receipt:channel"),
        ("sms", "accepted"),
    ]
    assert live.events(rec.id)[-3:] == ["sent", "queued", "sent"]
