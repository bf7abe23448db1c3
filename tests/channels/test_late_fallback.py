"""Channel fallback after acceptance: a status webhook says the rich channel could not carry it.

WhatsApp through Meta's Cloud API, SMS through Twilio, both stand-ins on 127.0.0.1,
the webhooks signed as the vendors sign them. The recipient is ``sent`` on
WhatsApp; a ``failed`` status with a channel code (131026, 131047) moves it on to
SMS through the send path, as a refusal at send time does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import requests
from sqlalchemy import select, update

from dispatcher import outbox
from dispatcher.batches.models import Attempt, Batch, Recipient, StatusEvent
from dispatcher.channels.base import CHANNEL_FAILED
from dispatcher.channels.twilio import TwilioProvider
from dispatcher.channels.whatsapp_cloud import WhatsAppCloudProvider
from dispatcher.db import transaction, utcnow
from dispatcher.engine import fallback
from dispatcher.engine.sending import send_recipients
from dispatcher.receipts import service as receipts
from dispatcher.receipts.models import PendingReceipt
from dispatcher.states import BatchStatus, RecipientStatus
from dispatcher.webhooks.models import Callback
from tests.factories import Tenant
from tests.helpers import RecordingPublisher
from tests.helpers.providers import Live, counts
from tests.standins import Reply, Request
from tests.standins.twilio import Twilio, error
from tests.standins.whatsapp import ERRORS, WhatsApp, notify, status

R, B = RecipientStatus, BatchStatus
NUMBER_ID = "106540352242922"
APP_SECRET = "meta-app-secret-0123456789"
SID = "AC" + "0123456789abcdef" * 2
TOKEN = "twilio-auth-token-0123456789abcdef"
TO = "+447700900001"


@pytest.fixture()
def meta() -> Iterator[WhatsApp]:
    with WhatsApp(tokens={NUMBER_ID: "EAAG-token"}) as stand_in:
        yield stand_in  # type: ignore[misc]


@pytest.fixture()
def twilio() -> Iterator[Twilio]:
    with Twilio(account_sid=SID, auth_token=TOKEN) as stand_in:
        yield stand_in  # type: ignore[misc]


@pytest.fixture()
def live(live_factory: Callable[..., Live]) -> Live:
    return live_factory(whatsapp_app_secret=APP_SECRET, twilio_auth_token=TOKEN)


@pytest.fixture()
def providers(meta: WhatsApp, twilio: Twilio) -> dict[str, Any]:
    return {
        "whatsapp": WhatsAppCloudProvider(
            tokens={NUMBER_ID: "EAAG-token"},
            phone_number_id=NUMBER_ID,
            api_url=meta.api_url,
            session=requests.Session(),
            timeout=(3, 10),
        ),
        "sms": TwilioProvider(
            account_sid=SID,
            auth_token=TOKEN,
            api_url=twilio.url,
            session=requests.Session(),
            timeout=(3, 10),
        ),
    }


def hook(live: Live) -> str:
    return f"{live.url}/providers/whatsapp/webhook"


def failed(live: Live, ref: str, code: int = 131026) -> requests.Response:
    reply = notify(hook(live), [status(ref, "failed", code=code)], app_secret=APP_SECRET)
    assert reply.status_code == 200
    return reply


def sent_on_whatsapp(
    live: Live, tenant: Tenant, providers: dict[str, Any], numbers: list[str], **body: Any
) -> str:
    """A batch whatsapp -> sms whose recipients WhatsApp accepted (sent)."""
    body.setdefault("fallback_channels", ["sms"])
    batch_id = live.queued_batch(tenant, numbers, channel="whatsapp", **body)
    live.send(providers, batch_id)
    assert all(r.status == R.SENT and r.channel == "whatsapp" for r in live.recipients(batch_id))
    return batch_id


def one_sent_on_whatsapp(
    live: Live, tenant: Tenant, providers: dict[str, Any]
) -> tuple[str, Recipient, str]:
    """A one-recipient batch whatsapp -> sms, sent on WhatsApp: its id, the row, the message id."""
    batch_id = sent_on_whatsapp(live, tenant, providers, [TO])
    [rec] = live.recipients(batch_id)
    return batch_id, rec, str(rec.provider_message_id)


def sent_by_sms(live: Live, providers: dict[str, Any], batch_id: str) -> Recipient:
    """Send the batch's queued work; its one recipient must now be sent by SMS."""
    live.send(providers, batch_id)
    [rec] = live.recipients(batch_id)
    assert (rec.status, rec.channel) == (R.SENT, "sms")
    return rec


def history(live: Live, recipient_id: str) -> list[tuple[str, str | None, str | None]]:
    """(status, channel, error code) of each status event, in order."""
    with live.sessions() as session:
        return [
            (e.status, e.channel, e.error_code)
            for e in session.scalars(
                select(StatusEvent)
                .where(StatusEvent.recipient_id == recipient_id)
                .order_by(StatusEvent.id)
            )
        ]


def payloads(live: Live, recipient_id: str) -> list[dict[str, Any]]:
    with live.sessions() as session:
        return [
            dict(c.payload)
            for c in session.scalars(
                select(Callback)
                .where(Callback.recipient_id == recipient_id)
                .order_by(Callback.created_at, Callback.event_type)
            )
        ]


def published(publisher: RecordingPublisher, batch_id: str) -> list[list[str]]:
    """The recipient ids of each send_recipients task published for the batch."""
    return [
        m.kwargs["recipient_ids"]
        for m in publisher.messages
        if isinstance(m, outbox.Message)
        and m.task is outbox.TaskName.SEND_RECIPIENTS
        and m.kwargs["batch_id"] == batch_id
    ]


def late_word(live: Live, provider: str, ref: str, status: str) -> receipts.Accepted:
    """A receipt for ``ref`` straight into the receipts service, as a webhook hands it over."""
    with transaction(live.sessions) as session:
        return receipts.accept(
            session=session,
            provider=provider,
            receipts=[receipts.Receipt(ref, status, "63016" if status != "delivered" else None)],
            now=utcnow(),
        )


def kept(live: Live, ref: str) -> int:
    """How many receipts for ``ref`` are stored as early (waiting for their message)."""
    with live.sessions() as session:
        rows = session.scalars(
            select(PendingReceipt.id).where(PendingReceipt.provider_message_id == ref)
        )
        return len(rows.all())


def batch_status(live: Live, batch_id: str) -> BatchStatus:
    with live.sessions() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        return batch.status


@pytest.mark.parametrize("code", [131026, 131047])
def test_a_late_channel_failure_moves_the_recipient_on_to_sms(
    live: Live,
    tenant: Tenant,
    providers: dict[str, Any],
    twilio: Twilio,
    publisher: RecordingPublisher,
    code: int,
) -> None:
    batch_id = sent_on_whatsapp(live, tenant, providers, [TO, "+447700900002"])
    rec, other = live.recipients(batch_id)
    # Every recipient handed over: the batch is completed until the webhook re-opens it.
    assert batch_status(live, batch_id) is B.COMPLETED
    assert counts(failed(live, str(rec.provider_message_id), code)) == (1, 0)

    rec = live.recipients(batch_id)[0]
    assert (rec.status, rec.channel, rec.channel_index) == (R.QUEUED, "sms", 1)
    assert (rec.error_code, rec.error_text) == (f"whatsapp_{code}", f"{ERRORS[code]} (details)")
    assert batch_status(live, batch_id) is B.SENDING
    # Back in the send path as a fresh queued recipient: a send_recipients task of its own.
    assert published(publisher, batch_id) == [[rec.id]]
    assert twilio.seen == []

    live.send(providers, batch_id)
    rec, again = live.recipients(batch_id)
    assert (rec.status, rec.channel, rec.provider) == (R.SENT, "sms", "twilio")
    assert str(rec.provider_message_id).startswith("SM") and rec.error_code is None
    assert [r.form()["To"] for r in twilio.seen] == [[TO]]
    assert (again.status, again.channel) == (R.SENT, "whatsapp")
    assert batch_status(live, batch_id) is B.COMPLETED
    # The attempt keeps the provider's code and text; the client sees the rich attempt
    # end (queued, under whatsapp, with its error), then the SMS one.
    assert [a[:2] for a in live.attempts(rec.id)] == [
        ("whatsapp", "accepted"),
        ("whatsapp", "receipt:channel"),
        ("sms", "accepted"),
    ]
    assert live.attempts(rec.id)[1][2] == f"{ERRORS[code]} (details)"
    assert history(live, rec.id)[-3:] == [
        ("sent", "whatsapp", None),
        ("queued", "whatsapp", f"whatsapp_{code}"),
        ("sent", "sms", None),
    ]
    sent_wa, requeued, sent_sms = payloads(live, rec.id)[-3:]
    assert (sent_wa["type"], sent_wa["channel"]) == ("message.sent", "whatsapp")
    assert (requeued["type"], requeued["channel"]) == ("message.queued", "whatsapp")
    assert requeued["error"] == {"code": f"whatsapp_{code}", "text": f"{ERRORS[code]} (details)"}
    assert (sent_sms["type"], sent_sms["channel"], sent_sms["error"]) == (
        "message.sent",
        "sms",
        None,
    )
    assert history(live, other.id)[-1] == ("sent", "whatsapp", None)


def test_no_channel_left_fails_the_recipient_with_the_code_kept(
    live: Live, tenant: Tenant, providers: dict[str, Any], publisher: RecordingPublisher
) -> None:
    batch_id = sent_on_whatsapp(live, tenant, providers, [TO], fallback_channels=[])
    [rec] = live.recipients(batch_id)
    assert counts(failed(live, str(rec.provider_message_id))) == (1, 0)
    [rec] = live.recipients(batch_id)
    assert (rec.status, rec.channel, rec.error_code) == (R.FAILED, "whatsapp", "whatsapp_131026")
    assert history(live, rec.id)[-1] == ("failed", "whatsapp", "whatsapp_131026")
    assert payloads(live, rec.id)[-1]["type"] == "message.failed"
    assert live.attempts(rec.id)[-1][:2] == ("whatsapp", "receipt:channel")
    assert published(publisher, batch_id) == []


def test_a_failure_for_the_recipient_is_not_a_fallback(
    live: Live, tenant: Tenant, providers: dict[str, Any]
) -> None:
    batch_id, _rec, ref = one_sent_on_whatsapp(live, tenant, providers)
    failed(live, ref, code=131021)
    [rec] = live.recipients(batch_id)
    assert (rec.status, rec.channel, rec.error_code) == (R.FAILED, "whatsapp", "whatsapp_131021")


def test_duplicate_and_late_statuses_change_nothing_and_sms_goes_once(
    live: Live, tenant: Tenant, providers: dict[str, Any], twilio: Twilio
) -> None:
    batch_id, rec, ref = one_sent_on_whatsapp(live, tenant, providers)
    # Failed twice in one notification, then again: applied once.
    reply = notify(
        hook(live),
        [status(ref, "failed", code=131026), status(ref, "failed", code=131026)],
        app_secret=APP_SECRET,
    )
    assert counts(reply) == (1, 1)
    before = history(live, rec.id)
    for late in (status(ref, "failed", code=131047), status(ref, "delivered")):
        assert counts(notify(hook(live), [late], app_secret=APP_SECRET)) == (0, 1)
    assert history(live, rec.id) == before
    live.send(providers, batch_id)
    rec = sent_by_sms(live, providers, batch_id)
    after_sms = history(live, rec.id)
    # WhatsApp's late word on its own attempt, once the SMS went: nothing moves.
    # Known by the attempt it ended, so acknowledged as ignored (not kept as early).
    for late in (status(ref, "delivered"), status(ref, "read"), status(ref, "failed", code=131026)):
        assert counts(notify(hook(live), [late], app_secret=APP_SECRET)) == (0, 1)
    [rec] = live.recipients(batch_id)
    assert (rec.status, rec.channel) == (R.SENT, "sms")
    assert history(live, rec.id) == after_sms
    assert len(twilio.seen) == 1


def test_an_out_of_order_failure_after_delivered_changes_nothing(
    live: Live, tenant: Tenant, providers: dict[str, Any], publisher: RecordingPublisher
) -> None:
    batch_id, rec, ref = one_sent_on_whatsapp(live, tenant, providers)
    notify(hook(live), [status(ref, "delivered")], app_secret=APP_SECRET)
    assert counts(failed(live, ref)) == (0, 1)
    [rec] = live.recipients(batch_id)
    assert (rec.status, rec.channel) == (R.DELIVERED, "whatsapp")
    assert published(publisher, batch_id) == []


def test_cancel_stops_a_recipient_queued_again_by_a_late_failure(
    live: Live, tenant: Tenant, providers: dict[str, Any], twilio: Twilio
) -> None:
    batch_id, rec, ref = one_sent_on_whatsapp(live, tenant, providers)
    failed(live, ref)
    reply = live.client.delete(f"/batch/{batch_id}", headers=tenant.auth)
    assert reply.status_code == 200, reply.get_json()
    assert reply.get_json()["cancelledCount"] == 1
    live.send(providers, batch_id)
    [rec] = live.recipients(batch_id)
    assert rec.status == R.CANCELLED
    assert twilio.seen == []
    # WhatsApp's later word on the message it had changes nothing, and is not kept.
    for word in LATE_WORDS:
        assert late_word(live, "whatsapp_cloud", ref, word) == receipts.Accepted(ignored=1)
    assert live.recipients(batch_id)[0].status == R.CANCELLED
    assert kept(live, ref) == 0


def test_a_late_failure_in_a_cancelled_batch_is_cancelled_not_sent(
    live: Live, tenant: Tenant, providers: dict[str, Any], twilio: Twilio
) -> None:
    batch_id = sent_on_whatsapp(live, tenant, providers, [TO])
    # Another recipient still waits, so the batch is sending and can be cancelled.
    with transaction(live.sessions) as session:
        session.execute(update(Batch).where(Batch.id == batch_id).values(status=B.SENDING))
    assert live.client.delete(f"/batch/{batch_id}", headers=tenant.auth).status_code == 200
    [rec] = live.recipients(batch_id)
    assert counts(failed(live, str(rec.provider_message_id))) == (1, 0)
    [rec] = live.recipients(batch_id)
    assert rec.status == R.CANCELLED
    assert [s for s, _c, _e in history(live, rec.id)][-2:] == ["queued", "cancelled"]
    assert twilio.seen == []


def test_a_late_failure_past_expiry_expires_the_recipient(
    live: Live, tenant: Tenant, providers: dict[str, Any], publisher: RecordingPublisher
) -> None:
    batch_id = sent_on_whatsapp(live, tenant, providers, [TO])
    with transaction(live.sessions) as session:
        past = utcnow() - timedelta(seconds=1)
        session.execute(update(Batch).where(Batch.id == batch_id).values(expire_at=past))
    [rec] = live.recipients(batch_id)
    failed(live, str(rec.provider_message_id))
    [rec] = live.recipients(batch_id)
    assert rec.status == R.EXPIRED
    # Its expire_at stopped the next channel's send: the batch ends expired, as it would
    # had the failure come before the batch completed (it ended completed, or expired).
    assert batch_status(live, batch_id) is B.EXPIRED
    assert published(publisher, batch_id) == []


def test_a_failure_that_arrives_before_the_send_returns_falls_back(
    live: Live, tenant: Tenant, providers: dict[str, Any], meta: WhatsApp, twilio: Twilio
) -> None:
    answers: list[dict[str, int]] = []

    def fail_first(request: Request, reply: Reply) -> None:
        ref = reply.body["messages"][0]["id"]
        answers.append(failed(live, ref).json())

    meta.before_reply = fail_first
    batch_id = live.queued_batch(tenant, [TO], channel="whatsapp", fallback_channels=["sms"])
    live.send(providers, batch_id)
    # Kept while the send was in flight, applied in the transaction that recorded it.
    assert answers == [{"applied": 0, "pending": 1, "ignored": 0}]
    [rec] = live.recipients(batch_id)
    assert (rec.status, rec.channel, rec.error_code) == (R.QUEUED, "sms", "whatsapp_131026")
    rec = sent_by_sms(live, providers, batch_id)
    assert [s for s, _c, _e in history(live, rec.id)][-3:] == ["sent", "queued", "sent"]
    assert len(twilio.seen) == 1


def test_the_fallback_waits_its_turn_behind_the_accounts_earlier_work(
    live: Live, tenant: Tenant, providers: dict[str, Any], twilio: Twilio
) -> None:
    batch_id, rec, ref = one_sent_on_whatsapp(live, tenant, providers)
    # An earlier batch of the same account with 20 recipients still queued, at 2/s.
    earlier = live.queued_batch(tenant, [f"+4477009011{i:02d}" for i in range(20)], channel="sms")
    with transaction(live.sessions) as session:
        before = utcnow() - timedelta(hours=1)
        session.execute(update(Batch).where(Batch.id == earlier).values(send_at=before))
    failed(live, ref)
    settings = live.runtime.settings.replace(default_account_rate=2.0)
    report = send_recipients(
        factory=live.sessions,
        settings=settings,
        providers=providers,
        limiter=live.runtime.limiter,
        batch_id=batch_id,
        recipient_ids=[rec.id],
    )
    # Ten seconds of the account's rate are ahead of it: deferred, not sent out of turn.
    assert (report.claimed, report.deferred) == (0, 1)
    [rec] = live.recipients(batch_id)
    assert rec.status == R.QUEUED and rec.next_attempt_at is not None
    assert twilio.seen == []


def test_no_secret_shows_in_logs_metrics_or_replies(
    live_factory: Callable[..., Live],
    tenant: Tenant,
    providers: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    live = live_factory(
        whatsapp_app_secret=APP_SECRET, twilio_auth_token=TOKEN, metrics_token="metrics-0123"
    )
    batch_id, _rec, ref = one_sent_on_whatsapp(live, tenant, providers)
    replies = [
        failed(live, ref).text,
        notify(hook(live), [], app_secret="wrong-secret").text,
    ]
    live.send(providers, batch_id)
    scrape = live.client.get("/metrics", headers={"Authorization": "Bearer metrics-0123"})
    assert scrape.status_code == 200
    seen = "\n".join([*replies, scrape.get_data(as_text=True), caplog.text])
    for secret in (APP_SECRET, TOKEN, "EAAG-token"):
        assert secret not in seen


LATE_WORDS = ("delivered", "read", "failed", "expired", CHANNEL_FAILED)


def test_a_recipient_queued_again_forgets_the_rich_message_and_its_late_word_is_ignored(
    live: Live, tenant: Tenant, providers: dict[str, Any]
) -> None:
    batch_id, rec, ref = one_sent_on_whatsapp(live, tenant, providers)
    rich_sent_at = rec.sent_at
    assert rec.provider == "whatsapp_cloud" and rich_sent_at is not None
    failed(live, ref)
    [rec] = live.recipients(batch_id)
    # Queued on SMS: nothing of the WhatsApp message is left on the row...
    assert (rec.status, rec.provider_message_id, rec.provider, rec.sent_at) == (
        R.QUEUED,
        None,
        None,
        None,
    )
    # ...its history is on the attempts.
    with live.sessions() as session:
        refs = session.execute(
            select(Attempt.outcome, Attempt.provider_message_id)
            .where(Attempt.recipient_id == rec.id)
            .order_by(Attempt.id)
        ).all()
    assert [tuple(r) for r in refs] == [("accepted", ref), ("receipt:channel", ref)]
    # While it waits for its SMS turn, the old message's word is known and ignored.
    for word in LATE_WORDS:
        assert late_word(live, "whatsapp_cloud", ref, word) == receipts.Accepted(ignored=1)
    [rec] = live.recipients(batch_id)
    assert (rec.status, rec.channel) == (R.QUEUED, "sms")

    live.send(providers, batch_id)
    [rec] = live.recipients(batch_id)
    sms = (R.SENT, "sms", "twilio", rec.provider_message_id, rec.sent_at)
    assert str(rec.provider_message_id).startswith("SM")
    assert rec.sent_at is not None and rec.sent_at >= rich_sent_at
    trail = history(live, rec.id)
    # Once the SMS went, no word on the old message (by any provider) moves the SMS send.
    for provider in ("whatsapp_cloud", "twilio"):
        for word in LATE_WORDS:
            assert late_word(live, provider, ref, word) == receipts.Accepted(ignored=1)
    [rec] = live.recipients(batch_id)
    assert (rec.status, rec.channel, rec.provider, rec.provider_message_id, rec.sent_at) == sms
    assert history(live, rec.id) == trail
    assert kept(live, ref) == 0
    # The SMS's own receipt still lands.
    assert late_word(live, "twilio", str(rec.provider_message_id), "delivered").applied == 1
    assert live.recipients(batch_id)[0].status == R.DELIVERED


def test_an_sms_refused_after_a_late_fallback_reports_no_rich_message(
    live: Live, tenant: Tenant, providers: dict[str, Any], twilio: Twilio
) -> None:
    batch_id, rec, ref = one_sent_on_whatsapp(live, tenant, providers)
    failed(live, ref)
    twilio.errors[TO] = error(400, 21211, "The 'To' number is not a valid phone number.")
    live.send(providers, batch_id)
    [rec] = live.recipients(batch_id)
    assert (rec.status, rec.channel, rec.error_code) == (R.FAILED, "sms", "twilio_21211")
    assert (rec.provider_message_id, rec.provider, rec.sent_at) == (None, None, None)
    reply = live.client.get(f"/batch/{batch_id}/messages", headers=tenant.auth)
    assert reply.status_code == 200, reply.get_json()
    [shown] = reply.get_json()["messages"]
    assert (shown["status"], shown["providerMessageId"], shown["sentAt"]) == ("failed", None, None)
    assert late_word(live, "whatsapp_cloud", ref, "delivered") == receipts.Accepted(ignored=1)
    assert live.recipients(batch_id)[0].status == R.FAILED


def test_the_receipt_deadline_does_not_catch_the_next_channels_send(
    live: Live, tenant: Tenant, providers: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    if not live.runtime.settings.database_url.startswith("postgresql"):
        pytest.skip("SQLite takes the write lock at BEGIN: nothing commits inside the sweep")
    batch_id, rec, ref = one_sent_on_whatsapp(live, tenant, providers)
    deadline = live.runtime.settings.receipt_deadline
    with transaction(live.sessions) as session:
        overdue = utcnow() - timedelta(seconds=deadline + 60)
        session.execute(update(Recipient).where(Recipient.id == rec.id).values(sent_at=overdue))
    moves = receipts.transition_recipients

    def moved_on_meanwhile(**kwargs: Any) -> Any:
        # The sweep has read the WhatsApp message as overdue; before it writes, the late
        # failure and the SMS send commit (two other transactions, as two workers would).
        if kwargs["to"] is R.UNKNOWN and kwargs["ids"] == [rec.id]:
            failed(live, ref)
            live.send(providers, batch_id)
        return moves(**kwargs)

    monkeypatch.setattr(receipts, "transition_recipients", moved_on_meanwhile)
    with transaction(live.sessions) as session:
        swept = receipts.sweep(session=session, settings=live.runtime.settings, now=utcnow())
    assert swept.unknown == 0
    [rec] = live.recipients(batch_id)
    assert (rec.status, rec.channel, rec.provider, rec.error_code) == (
        R.SENT,
        "sms",
        "twilio",
        None,
    )
    assert [s for s, _c, _e in history(live, rec.id)][-3:] == ["sent", "queued", "sent"]


def test_a_repeated_late_failure_read_before_the_first_moved_it_on_changes_nothing(
    live: Live, tenant: Tenant, providers: dict[str, Any], twilio: Twilio,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """WhatsApp sends a failed status again (it retries webhooks). On PostgreSQL the
    second one's transaction may read the message as sent just before the first one
    moves it on and the SMS goes: it must not move the recipient (now sent by SMS) back
    to queued, or the SMS goes twice and its receipts match nothing."""
    if not live.runtime.settings.database_url.startswith("postgresql"):
        pytest.skip("SQLite takes the write lock at BEGIN: nothing commits inside a receipt")
    batch_id, _rec, ref = one_sent_on_whatsapp(live, tenant, providers)
    inner = fallback._fall_back_in
    first: list[str] = []

    def meanwhile(**kwargs: Any) -> Any:
        # This transaction has read the WhatsApp message as sent; before it writes, the
        # first delivery of the status and the SMS send commit (as other workers would).
        if not first:
            first.append(ref)
            failed(live, ref)
            sent_by_sms(live, providers, batch_id)
        return inner(**kwargs)

    monkeypatch.setattr(fallback, "_fall_back_in", meanwhile)
    late_word(live, "whatsapp_cloud", ref, CHANNEL_FAILED)
    [now] = live.recipients(batch_id)
    assert (now.status, now.channel) == (R.SENT, "sms")
    assert now.provider_message_id is not None and now.provider_message_id != ref
    live.send(providers, batch_id)
    assert len(twilio.seen) == 1
