"""The three vendors wired from settings into real Celery worker processes.

RCS through RBM, WhatsApp through the Cloud API and SMS through Twilio, each
against its stand-in; the worker builds its providers from
DISPATCHER_CHANNEL_PROVIDERS, and the vendors' webhooks reach a live API.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from cryptography.hazmat.primitives.asymmetric import rsa

from dispatcher.config import Settings
from dispatcher.runtime import Runtime
from dispatcher.states import RecipientStatus
from tests.engine import system
from tests.factories import Tenant
from tests.helpers import free_port, make_settings, wait_for
from tests.helpers.providers import Live, counts
from tests.standins.rbm import Rbm, event, push, write_key_file
from tests.standins.twilio import Twilio, callback, status_params
from tests.standins.whatsapp import WhatsApp, notify, status
from workers.celery_app import create_celery

pytestmark = pytest.mark.system
R = RecipientStatus
SID, TWILIO_TOKEN = "AC" + "f" * 32, "twilio-system-token"
NUMBER_ID, WA_TOKEN, APP_SECRET = "106540352242922", "EAAG-system", "meta-system-secret"
CLIENT_TOKEN = "rbm-system-client-token"
RCS, WHATSAPP, SMS = "+447700900501", "+447700900502", "+447700900503"


@pytest.fixture(scope="module")
def vendors() -> Iterator[tuple[Rbm, WhatsApp, Twilio]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with (
        Rbm(public_key=key.public_key()) as rbm,
        WhatsApp(tokens={NUMBER_ID: WA_TOKEN}) as meta,
        Twilio(account_sid=SID, auth_token=TWILIO_TOKEN) as twilio,
    ):
        rbm.key = key  # type: ignore[attr-defined]
        yield rbm, meta, twilio  # type: ignore[misc]


@pytest.fixture(scope="module")
def settings_for_vendors(
    sqlite_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    vendors: tuple[Rbm, WhatsApp, Twilio],
) -> Settings:
    rbm, meta, twilio = vendors
    var = tmp_path_factory.mktemp("vendors")
    key_file = var / "rbm-key.json"
    write_key_file(key_file, rbm.key, rbm.token_uri)  # type: ignore[attr-defined]
    port = free_port()
    return make_settings(
        database_url=sqlite_url,
        redis_url=redis_url,
        var=var,
        api_port=port,
        public_base_url=f"http://127.0.0.1:{port}",
        channel_providers={"rcs": "rbm", "whatsapp": "whatsapp_cloud", "sms": "twilio"},
        rbm_agent_id="dispatcher@rbm.goog",
        rbm_service_account_file=str(key_file),
        rbm_api_url=rbm.url,
        rbm_client_token=CLIENT_TOKEN,
        whatsapp_api_url=meta.api_url,
        whatsapp_phone_number_id=NUMBER_ID,
        whatsapp_tokens={NUMBER_ID: WA_TOKEN},
        whatsapp_app_secret=APP_SECRET,
        twilio_api_url=twilio.url,
        twilio_account_sid=SID,
        twilio_auth_token=TWILIO_TOKEN,
    )


@pytest.fixture(scope="module")
def api(settings_for_vendors: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The API on the public port, publishing to the real broker; a worker and beat beside it."""
    settings = settings_for_vendors
    redis.Redis.from_url(settings.redis_url).flushdb()
    runtime: Runtime = create_celery(settings).runtime  # type: ignore[attr-defined]
    live = Live(runtime, settings.api_port)
    logs = tmp_path_factory.mktemp("vendor-logs")
    with system.Together() as processes:
        processes.add(system.worker_process(settings, logs, concurrency=2))
        processes.add(system.beat_process(settings, logs))
        yield live
    live.close()


def test_each_channel_goes_to_its_vendor_and_falls_back_by_their_answers(
    api: Live, vendors: tuple[Rbm, WhatsApp, Twilio]
) -> None:
    rbm, meta, twilio = vendors
    rbm.not_capable.update({WHATSAPP, SMS})
    meta.errors[SMS.lstrip("+")] = 131026
    tenant = Tenant(api.sessions)
    reply = api.client.post(
        "/batch",
        json={
            "from": "Dispatcher",
            "message": "hello",
            "destinations": [RCS, WHATSAPP, SMS],
            "channel": "rcs",
            "fallback_channels": ["whatsapp", "sms"],
        },
        headers=tenant.auth,
    )
    assert reply.status_code == 200, reply.get_json()
    batch_id = reply.get_json()["identifier"]
    wait_for(lambda: all(r.status == R.SENT for r in api.recipients(batch_id)), timeout=60)
    by_number = {r.to: r for r in api.recipients(batch_id)}
    assert {n: r.channel for n, r in by_number.items()} == {
        RCS: "rcs",
        WHATSAPP: "whatsapp",
        SMS: "sms",
    }
    assert len(twilio.requests_to("/Messages.json")) == 1
    assert twilio.requests_to("/Messages.json")[0].form()["StatusCallback"] == [
        f"{api.runtime.settings.public_base_url}/providers/twilio/status"
    ]

    hooks = api.runtime.settings.public_base_url + "/providers"
    rcs, wa, sms = by_number[RCS], by_number[WHATSAPP], by_number[SMS]
    assert counts(
        push(f"{hooks}/rbm/events", event("READ", rcs.id), client_token=CLIENT_TOKEN)
    ) == (1, 0)
    wa_reply = notify(
        f"{hooks}/whatsapp/webhook",
        [status(str(wa.provider_message_id), "delivered")],
        app_secret=APP_SECRET,
    )
    assert counts(wa_reply) == (1, 0)
    sms_params = status_params(str(sms.provider_message_id), "delivered", account_sid=SID)
    assert counts(callback(f"{hooks}/twilio/status", sms_params, auth_token=TWILIO_TOKEN)) == (1, 0)
    final = {r.to: r.status for r in api.recipients(batch_id)}
    assert final == {RCS: R.READ, WHATSAPP: R.DELIVERED, SMS: R.DELIVERED}
    body = api.client.get(f"/batch/{batch_id}", headers=tenant.auth).get_json()
    assert body["status"] == "completed"


def test_a_late_whatsapp_failure_goes_out_on_sms_through_the_workers(
    api: Live, vendors: tuple[Rbm, WhatsApp, Twilio]
) -> None:
    _rbm, _meta, twilio = vendors
    number = "+447700900504"
    tenant = Tenant(api.sessions)
    reply = api.client.post(
        "/batch",
        json={
            "from": "Dispatcher",
            "message": "hello",
            "destinations": [number],
            "channel": "whatsapp",
            "fallback_channels": ["sms"],
        },
        headers=tenant.auth,
    )
    assert reply.status_code == 200, reply.get_json()
    batch_id = reply.get_json()["identifier"]
    wait_for(lambda: api.recipients(batch_id)[0].status == R.SENT, timeout=60)
    [rec] = api.recipients(batch_id)
    assert rec.channel == "whatsapp"
    sms_before = len(twilio.requests_to("/Messages.json"))
    hook = api.runtime.settings.public_base_url + "/providers/whatsapp/webhook"
    failed = status(str(rec.provider_message_id), "failed", code=131047)
    assert counts(notify(hook, [failed], app_secret=APP_SECRET)) == (1, 0)
    # The worker takes the task the webhook published and hands the message to Twilio.
    wait_for(
        lambda: (
            (api.recipients(batch_id)[0].status, api.recipients(batch_id)[0].channel)
            == (R.SENT, "sms")
        ),
        timeout=60,
    )
    assert len(twilio.requests_to("/Messages.json")) == sms_before + 1
    body = api.client.get(f"/batch/{batch_id}", headers=tenant.auth).get_json()
    assert body["status"] == "completed"
