"""WhatsApp through Meta's Cloud API, against a stand-in of the Graph API on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from dispatcher.channels.base import OutboundMessage, Outcome
from dispatcher.channels.simulator import Simulator
from dispatcher.channels.whatsapp_cloud import WhatsAppCloudProvider
from dispatcher.states import RecipientStatus
from tests.factories import Tenant
from tests.helpers import wait_for
from tests.helpers.providers import Live, counts
from tests.standins import Reply, Request
from tests.standins.whatsapp import ERRORS, WhatsApp, notify, status

R = RecipientStatus
NUMBER_ID, OTHER_ID = "106540352242922", "106540352242923"
TOKENS = {NUMBER_ID: "EAAG-token-one", OTHER_ID: "EAAG-token-two"}
APP_SECRET = "meta-app-secret-0123456789"
VERIFY_TOKEN = "verify-me-0123"
TEMPLATE = {"name": "order_update", "language": "en_US", "parameters": ["Ann", "42"]}


@pytest.fixture()
def meta() -> Iterator[WhatsApp]:
    with WhatsApp(tokens=TOKENS) as stand_in:
        yield stand_in  # type: ignore[misc]


@pytest.fixture()
def provider(meta: WhatsApp) -> WhatsAppCloudProvider:
    return WhatsAppCloudProvider(
        tokens=TOKENS,
        phone_number_id=NUMBER_ID,
        senders={"Shop": OTHER_ID},
        api_url=meta.api_url,
        session=requests.Session(),
        timeout=(3, 10),
    )


@pytest.fixture()
def live(live_factory: Callable[..., Live]) -> Live:
    return live_factory(whatsapp_app_secret=APP_SECRET, whatsapp_verify_token=VERIFY_TOKEN)


def message(
    to: str = "+447700900001", sender: str = "Acme", template: dict[str, Any] | None = None
) -> OutboundMessage:
    return OutboundMessage(
        recipient_id="r-1", channel="whatsapp", to=to, sender=sender, body="hi", template=template
    )


def test_a_text_message_goes_with_the_token_of_its_phone_number_id(
    provider: WhatsAppCloudProvider, meta: WhatsApp
) -> None:
    result = provider.send(message())
    assert result.outcome is Outcome.ACCEPTED
    assert str(result.provider_message_id).startswith("wamid.HBgL")
    [sent] = meta.seen
    assert sent.path == f"/v21.0/{NUMBER_ID}/messages"
    assert sent.headers["authorization"] == f"Bearer {TOKENS[NUMBER_ID]}"
    assert sent.json() == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "447700900001",
        "type": "text",
        "text": {"preview_url": False, "body": "hi"},
    }
    assert provider.send(message(sender="Shop")).outcome is Outcome.ACCEPTED
    assert meta.seen[-1].path == f"/v21.0/{OTHER_ID}/messages"
    assert meta.seen[-1].headers["authorization"] == f"Bearer {TOKENS[OTHER_ID]}"


def test_a_template_message_carries_name_language_and_parameters(
    provider: WhatsAppCloudProvider, meta: WhatsApp
) -> None:
    assert provider.send(message(template=TEMPLATE)).outcome is Outcome.ACCEPTED
    body = meta.seen[-1].json()
    assert body["type"] == "template"
    assert body["template"] == {
        "name": "order_update",
        "language": {"code": "en_US"},
        "components": [
            {
                "type": "body",
                "parameters": [{"type": "text", "text": "Ann"}, {"type": "text", "text": "42"}],
            }
        ],
    }


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (131047, Outcome.CHANNEL),
        (131026, Outcome.CHANNEL),
        (130429, Outcome.TRANSIENT),
        (131000, Outcome.TRANSIENT),
        (131021, Outcome.RECIPIENT),
    ],
)
def test_errors_are_classified_with_their_code_and_details(
    provider: WhatsAppCloudProvider, meta: WhatsApp, code: int, outcome: Outcome
) -> None:
    meta.errors["447700900001"] = code
    result = provider.send(message())
    assert result.outcome is outcome
    assert result.error_code == f"whatsapp_{code}"
    assert result.error_text and "(details)" in result.error_text


def test_an_expired_token_is_transient(meta: WhatsApp) -> None:
    stale = WhatsAppCloudProvider(
        tokens={NUMBER_ID: "expired"},
        phone_number_id=NUMBER_ID,
        api_url=meta.api_url,
        session=requests.Session(),
        timeout=(3, 10),
    )
    result = stale.send(message())
    assert (result.outcome, result.error_code) == (Outcome.TRANSIENT, "whatsapp_190")
    assert "expired" not in (result.error_text or "")


def test_a_refused_token_tells_the_operator_which_to_renew(
    meta: WhatsApp, operator_warnings: Callable[[], list[str]]
) -> None:
    stale = WhatsAppCloudProvider(
        tokens={NUMBER_ID: "expired"},
        phone_number_id=NUMBER_ID,
        api_url=meta.api_url,
        session=requests.Session(),
        timeout=(3, 10),
    )
    stale.send(message())
    stale.send(message())
    [line] = operator_warnings()
    assert line.startswith("whatsapp_cloud: the API refused our credentials (whatsapp_190")
    assert f"check DISPATCHER_WHATSAPP_TOKENS (the token of phone number id {NUMBER_ID})" in line
    assert "expired" not in line.split("(whatsapp_190")[0]


def test_a_phone_number_id_meta_does_not_know_falls_back_and_tells_the_operator(
    meta: WhatsApp, operator_warnings: Callable[[], list[str]]
) -> None:
    wrong = WhatsAppCloudProvider(
        tokens={"999000": "EAAG-token-one"},
        phone_number_id="999000",
        api_url=meta.api_url,
        session=requests.Session(),
        timeout=(3, 10),
    )
    results = [wrong.send(message()), wrong.send(message())]
    # Before: Graph's 100 was "invalid parameter", so every recipient failed for good.
    assert {(r.outcome, r.error_code) for r in results} == {(Outcome.CHANNEL, "whatsapp_100")}
    assert "Object with ID '999000' does not exist" in (results[0].error_text or "")
    [line] = operator_warnings()
    assert line.startswith("whatsapp_cloud: no usable phone number id 999000 (whatsapp_100")
    assert "DISPATCHER_WHATSAPP_PHONE_NUMBER_ID and DISPATCHER_WHATSAPP_SENDERS" in line
    assert "EAAG" not in line


def test_a_sender_with_no_phone_number_id_falls_back(meta: WhatsApp) -> None:
    bare = WhatsAppCloudProvider(
        tokens=TOKENS, api_url=meta.api_url, session=requests.Session(), timeout=(3, 10)
    )
    result = bare.send(message(sender="Nobody"))
    assert (result.outcome, result.error_code) == (Outcome.CHANNEL, "whatsapp_no_number")
    assert meta.seen == []


def test_re_engagement_and_non_users_fall_back_to_sms_within_the_same_send(
    live: Live, tenant: Tenant, provider: WhatsAppCloudProvider, meta: WhatsApp
) -> None:
    meta.text_errors["447700900002"] = 131047
    meta.errors["447700900003"] = 131026
    batch_id = live.queued_batch(
        tenant,
        ["+447700900001", "+447700900002", "+447700900003"],
        channel="whatsapp",
        fallback_channels=["sms"],
    )
    sms = Simulator(redis_client=live.runtime.redis, rules={})
    live.send({"whatsapp": provider, "sms": sms}, batch_id)
    ok, outside_window, not_a_user = live.recipients(batch_id)
    assert (ok.status, ok.channel) == (R.SENT, "whatsapp")
    assert ok.provider_message_id and ok.provider_message_id.startswith("wamid.")
    for rec, code in ((outside_window, 131047), (not_a_user, 131026)):
        assert (rec.status, rec.channel) == (R.SENT, "sms")
        attempts = live.attempts(rec.id)
        assert [a[:2] for a in attempts] == [("whatsapp", "channel"), ("sms", "accepted")]
        assert attempts[0][2] == f"{ERRORS[code]} (details)"
    assert live.events(outside_window.id).count("sent") == 1


def test_a_batch_template_reaches_whatsapp_and_the_body_reaches_sms(
    live: Live, tenant: Tenant, provider: WhatsAppCloudProvider, meta: WhatsApp
) -> None:
    meta.errors["447700900002"] = 131026
    batch_id = live.queued_batch(
        tenant,
        ["+447700900001", "+447700900002"],
        channel="whatsapp",
        fallback_channels=["sms"],
        whatsapp_template=TEMPLATE,
    )
    sms = Simulator(redis_client=live.runtime.redis, rules={})
    live.send({"whatsapp": provider, "sms": sms}, batch_id)
    assert [r.channel for r in live.recipients(batch_id)] == ["whatsapp", "sms"]
    assert meta.seen[0].json()["template"]["name"] == "order_update"


@pytest.mark.parametrize(
    ("template", "extra", "field"),
    [
        ({"name": "Bad Name", "language": "en_US"}, {}, "name"),
        ({"name": "ok", "language": "english"}, {}, "language"),
        ({"name": "ok", "language": "en", "parameters": [""]}, {}, "parameters"),
        ({"name": "ok"}, {}, "language"),
        ({"name": "ok", "language": "en", "colour": "red"}, {}, "colour"),
        ({"name": "ok", "language": "en"}, {"channel": "sms"}, "whatsapp_template"),
        ("order_update", {}, "whatsapp_template"),
    ],
)
def test_an_invalid_template_is_400_and_writes_nothing(
    live: Live, tenant: Tenant, template: Any, extra: dict[str, Any], field: str
) -> None:
    body = {
        "from": "Dispatcher",
        "message": "hello",
        "destinations": ["+447700900001"],
        "channel": "whatsapp",
        "whatsapp_template": template,
        **extra,
    }
    reply = live.client.post("/batch", json=body, headers=tenant.auth)
    assert reply.status_code == 400, reply.get_json()
    assert field in reply.get_json()["message"]


# --- the webhook ------------------------------------------------------------------


def hook(live: Live) -> str:
    return f"{live.url}/providers/whatsapp/webhook"


def test_the_verification_handshake_answers_the_challenge(live: Live) -> None:
    query = {
        "hub.mode": "subscribe",
        "hub.verify_token": VERIFY_TOKEN,
        "hub.challenge": "1158201444",
    }
    reply = requests.get(hook(live), params=query, timeout=10)
    assert (reply.status_code, reply.text) == (200, "1158201444")
    for wrong in ({"hub.verify_token": "nope"}, {"hub.mode": "unsubscribe"}):
        refused = requests.get(hook(live), params={**query, **wrong}, timeout=10)
        assert refused.status_code == 401 and "1158201444" not in refused.text


def sent_whatsapp(
    live: Live, tenant: Tenant, provider: WhatsAppCloudProvider, count: int = 1
) -> Any:
    numbers = [f"+4477009000{i:02d}" for i in range(1, count + 1)]
    batch_id = live.queued_batch(tenant, numbers, channel="whatsapp")
    live.send({"whatsapp": provider}, batch_id)
    rows = live.recipients(batch_id)
    assert all(r.status == R.SENT for r in rows)
    return rows


def test_statuses_are_mapped_and_failures_keep_their_code(
    live: Live, tenant: Tenant, provider: WhatsAppCloudProvider
) -> None:
    read, failed = sent_whatsapp(live, tenant, provider, count=2)
    assert read.provider_message_id and failed.provider_message_id
    reply = notify(
        hook(live),
        [
            status(read.provider_message_id, "sent"),
            status(read.provider_message_id, "delivered"),
            status(failed.provider_message_id, "failed", code=131026),
        ],
        app_secret=APP_SECRET,
    )
    assert reply.status_code == 200 and counts(reply) == (2, 0)
    notify(hook(live), [status(read.provider_message_id, "read")], app_secret=APP_SECRET)
    read, failed = live.recipients(read.batch_id)
    assert read.status == R.READ
    assert live.events(read.id)[-2:] == ["delivered", "read"]
    assert (failed.status, failed.error_code) == (R.FAILED, "whatsapp_131026")
    assert failed.error_text == "Message undeliverable (details)"
    assert "message.failed" in live.callbacks(failed.id)


def test_duplicate_and_out_of_order_statuses_change_nothing(
    live: Live, tenant: Tenant, provider: WhatsAppCloudProvider
) -> None:
    [rec] = sent_whatsapp(live, tenant, provider)
    ref = rec.provider_message_id
    assert notify(hook(live), [status(ref, "read")], app_secret=APP_SECRET).json()["applied"] == 1
    before = live.events(rec.id)
    reply = notify(
        hook(live),
        [status(ref, "read"), status(ref, "delivered"), status(ref, "failed", code=131000)],
        app_secret=APP_SECRET,
    )
    assert counts(reply) == (0, 3)
    assert live.recipients(rec.batch_id)[0].status == R.READ
    assert live.events(rec.id) == before


@pytest.mark.parametrize("signature", ["", "sha256=00", "sha1=abc", None])
def test_a_bad_signature_is_401_before_the_body_is_read(
    live: Live, tenant: Tenant, provider: WhatsAppCloudProvider, signature: str | None
) -> None:
    [rec] = sent_whatsapp(live, tenant, provider)
    before = live.events(rec.id)
    reply = notify(
        hook(live),
        [status(str(rec.provider_message_id), "delivered")],
        app_secret="another-app-secret" if signature is None else APP_SECRET,
        signature=signature,
    )
    assert reply.status_code == 401
    assert APP_SECRET not in reply.text
    assert live.recipients(rec.batch_id)[0].status == R.SENT
    assert live.events(rec.id) == before


def test_a_signed_body_that_is_not_json_is_400(live: Live) -> None:
    import hashlib
    import hmac

    body = b"{not json"
    sig = "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
    reply = requests.post(hook(live), data=body, headers={"X-Hub-Signature-256": sig}, timeout=10)
    assert reply.status_code == 400


def test_a_status_that_arrives_before_the_send_returns_is_applied(
    live: Live, tenant: Tenant, provider: WhatsAppCloudProvider, meta: WhatsApp
) -> None:
    answers: list[dict[str, int]] = []

    def deliver_first(request: Request, reply: Reply) -> None:
        ref = reply.body["messages"][0]["id"]
        answers.append(notify(hook(live), [status(ref, "delivered")], app_secret=APP_SECRET).json())

    meta.before_reply = deliver_first
    batch_id = live.queued_batch(tenant, ["+447700900001"], channel="whatsapp")
    live.send({"whatsapp": provider}, batch_id)
    assert answers == [{"applied": 0, "pending": 1, "ignored": 0}]
    wait_for(lambda: live.recipients(batch_id)[0].status == R.DELIVERED, timeout=3)
    # Matched by (provider, id): the provider's name is what the send recorded.
    assert live.recipients(batch_id)[0].provider == "whatsapp_cloud"
