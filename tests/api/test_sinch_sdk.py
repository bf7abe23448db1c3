"""The official Sinch Python SDK (``sinch`` on PyPI) against a running Dispatcher.

Every call goes through the SDK's own client, over HTTP to a real server on
127.0.0.1 (werkzeug, threaded), authenticated with service_plan_id + sms_api_token
exactly as a team migrating from Sinch configures it; only the SMS origin differs.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis
from sinch import SinchClient
from sinch.domains.sms.api.v1.exceptions import SmsException
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.serving import make_server

from api.app import create_app
from dispatcher.accounts import service as accounts
from dispatcher.db import transaction, utcnow
from dispatcher.inbound import service as inbound
from dispatcher.runtime import Runtime
from dispatcher.webhooks import delivery
from dispatcher.webhooks.deliver import WebhookSender
from tests.factories import Tenant
from tests.helpers import in_thread, wait_for
from tests.helpers.sinch import A, B, C, callbacks, mark_sent, receipt, start_sending

D = "+447700900004"


@pytest.fixture()
def base_url(runtime: Runtime) -> Iterator[str]:
    """Dispatcher's API served over HTTP on a free 127.0.0.1 port for this test."""
    app = create_app(runtime.settings, runtime=runtime)
    with in_thread(make_server("127.0.0.1", 0, app, threaded=True)) as server:
        yield f"http://127.0.0.1:{server.server_port}"


def sdk(base_url: str, tenant: Tenant) -> Any:
    """The SDK's client as a Sinch customer configures it, pointed at Dispatcher."""
    client = SinchClient(service_plan_id=tenant.id, sms_api_token=tenant.key, sms_region="us")
    client.configuration.sms_domain_with_service_plan_id = base_url
    return client.sms


def error_of(exc: pytest.ExceptionInfo[SmsException]) -> tuple[int, dict[str, Any]]:
    response = exc.value.http_response
    assert response is not None
    return response.status_code, response.body


def test_batches_send_get_list_update_replace_dry_run_cancel(base_url: str, tenant: Tenant) -> None:
    sms = sdk(base_url, tenant)
    sent = sms.batches.send_sms(
        to=[A, B[1:]], from_="Acme", body="Hello", client_reference="ref-1", feedback_enabled=True
    )
    # Numbers are accepted with or without + and returned with it (the SDK's models use +).
    assert sorted(sent.to) == [A, B]
    assert sent.from_ == "Acme" and sent.canceled is False
    assert sms.batches.get(batch_id=sent.id).body == "Hello"

    other = sms.batches.send_sms(to=[C], from_="Other", body="Hi")
    sms.batches.send_sms(to=[C], from_="Third", body="Hi")
    # from_ as a list: the SDK repeats the query parameter.
    listed = list(sms.batches.list(from_=["Acme", "Other"], page_size=1).iterator())
    assert {b.id for b in listed} == {sent.id, other.id}
    assert [b.id for b in sms.batches.list(client_reference="ref-1").content()] == [sent.id]

    # update_sms always sends "type": "mt_text".
    updated = sms.batches.update_sms(
        batch_id=sent.id, body="Changed", to_add=[C], to_remove=[B], delivery_report="full"
    )
    assert updated.body == "Changed" and sorted(updated.to) == [A, C]
    assert updated.delivery_report == "full"

    replaced = sms.batches.replace_sms(batch_id=sent.id, to=[D], from_="Acme", body="Replaced")
    assert replaced.to == [D] and replaced.body == "Replaced"

    dry = sms.batches.dry_run_sms(
        to=[A, B], from_="Acme", body="ж" * 80, per_recipient=True, number_of_recipients=1
    )
    assert dry.number_of_recipients == 2 and dry.number_of_messages == 4
    assert len(dry.per_recipient) == 1 and dry.per_recipient[0].encoding == "UNICODE"

    cancelled = sms.batches.cancel(batch_id=sent.id)
    assert cancelled.canceled is True


def test_delivery_feedback_and_reports(
    base_url: str, tenant: Tenant, sessions: sessionmaker[Session], runtime: Runtime
) -> None:
    sms = sdk(base_url, tenant)
    batch = sms.batches.send_sms(
        to=[A, B, C], from_="Acme", body="Hello", client_reference="r", feedback_enabled=True
    )
    start_sending(sessions, runtime.settings, batch.id)
    mark_sent(sessions, batch.id, [A, B, C])
    receipt(sessions, batch.id, B, "failed", "12")
    sms.batches.send_delivery_feedback(batch_id=batch.id, recipients=[A])

    full = sms.delivery_reports.get(
        batch_id=batch.id, report_type="full", status=["DELIVERED", "FAILED"], client_reference="r"
    )
    by_status = {s.status: s for s in full.statuses}
    assert set(by_status) == {"Delivered", "Failed"}
    assert by_status["Delivered"].recipients == [A] and by_status["Failed"].code == 12
    coded = sms.delivery_reports.get(batch_id=batch.id, report_type="summary", code=[401])
    assert [(s.status, s.count) for s in coded.statuses] == [("Dispatched", 1)]

    one = sms.delivery_reports.get_for_number(batch_id=batch.id, recipient=B)
    assert (one.status, one.code, one.recipient) == ("Failed", 12, B)
    assert one.operator_status_at is not None and one.number_of_message_parts == 1
    assert one.encoding == "GSM"

    listed = sms.delivery_reports.list(status=["DELIVERED"], client_reference="r").content()
    assert [(r.recipient, r.status) for r in listed] == [(A, "Delivered")]
    assert len(list(sms.delivery_reports.list(page_size=2).iterator())) == 3  # two pages


def test_not_found_in_sinch_shape(base_url: str, tenant: Tenant, other_tenant: Tenant) -> None:
    mine = sdk(base_url, tenant)
    batch = mine.batches.send_sms(to=[A], from_="Acme", body="Hello")
    group = mine.groups.create(name="Mine", members=[A])
    theirs = sdk(base_url, other_tenant)
    for call in (
        lambda: theirs.batches.get(batch_id=batch.id),
        lambda: theirs.batches.cancel(batch_id=batch.id),
        lambda: theirs.delivery_reports.get(batch_id=batch.id),
        lambda: theirs.groups.get(group_id=group.id),
        lambda: theirs.groups.list_members(group_id=group.id),
        lambda: theirs.groups.delete(group_id=group.id),
        lambda: theirs.batches.send_sms(to=[group.id], from_="X", body="Hi"),
    ):
        with pytest.raises(SmsException) as exc:
            call()
        status, body = error_of(exc)
        assert status == 404 and body["code"] == "not_found", body
    assert mine.groups.get(group_id=group.id).size == 1


def test_groups(base_url: str, tenant: Tenant) -> None:
    sms = sdk(base_url, tenant)
    group = sms.groups.create(name="Team", members=[A, B[1:]])
    assert group.size == 2 and group.name == "Team" and len(group.id) == 26
    other = sms.groups.create(name="Others", members=[C])

    assert {g.id for g in sms.groups.list(page_size=1).iterator()} == {group.id, other.id}
    assert sms.groups.get(group_id=group.id).name == "Team"
    assert sorted(sms.groups.list_members(group_id=group.id).content()) == [A, B]

    # The SDK sends every field of an update, the unset ones as null.
    updated = sms.groups.update(group_id=group.id, name="Team", add=[D], remove=[A])
    assert updated.size == 2 and updated.name == "Team"
    merged = sms.groups.update(group_id=group.id, name="Team", add_from_group=other.id)
    assert sorted(sms.groups.list_members(group_id=merged.id).content()) == [B, C, D]

    # Group ids stand for their members in to, to_add and to_remove.
    batch = sms.batches.send_sms(to=[other.id, A], from_="Acme", body="Hi")
    assert sorted(batch.to) == [A, C]
    batch = sms.batches.update_sms(batch_id=batch.id, to_add=[group.id], to_remove=[A])
    assert sorted(batch.to) == [B, C, D]
    batch = sms.batches.update_sms(batch_id=batch.id, to_remove=[other.id])
    assert sorted(batch.to) == [B, D]

    replaced = sms.groups.replace(group_id=group.id, name="New", members=[A])
    assert (replaced.name, replaced.size) == ("New", 1)
    sms.groups.delete(group_id=group.id)
    with pytest.raises(SmsException) as exc:
        sms.groups.get(group_id=group.id)
    assert error_of(exc)[0] == 404


def test_refusals_carry_sinch_codes(base_url: str, tenant: Tenant) -> None:
    sms = sdk(base_url, tenant)
    with pytest.raises(SmsException) as exc:
        sms.groups.create(name="x", members=[A], auto_update={"to": "12345"})
    status, body = error_of(exc)
    assert status == 400 and body["code"] == "syntax_constraint_violation"
    assert "auto_update" in body["text"]


class _Hook(BaseHTTPRequestHandler):
    seen: list[tuple[dict[str, str], bytes]] = []

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.seen.append((dict(self.headers.items()), body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture()
def hook() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    seen: list[tuple[dict[str, str], bytes]] = []
    handler = type("Hook", (_Hook,), {"seen": seen})
    with in_thread(ThreadingHTTPServer(("127.0.0.1", 0), handler)) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}/sinch", seen


def test_service_plan_defaults_and_sinch_signature(
    base_url: str,
    tenant: Tenant,
    sessions: sessionmaker[Session],
    runtime: Runtime,
    hook: tuple[str, list[tuple[dict[str, str], bytes]]],
) -> None:
    url, seen = hook
    sms = sdk(base_url, tenant)
    with pytest.raises(SmsException) as exc:
        sms.batches.send(request={"to": [A], "body": "Hi"})
    assert error_of(exc)[1]["code"] == "syntax_constraint_violation"

    with transaction(sessions) as session:
        accounts.set_plan(
            session=session,
            account_id=tenant.id,
            default_originator="AcmePlan",
            default_callback_url=url,
            callback_signing="sinch",
        )
    batch = sms.batches.send(
        request={"to": [A], "body": "Hi", "delivery_report": "per_recipient_final"}
    )
    assert batch.from_ == "AcmePlan"
    start_sending(sessions, runtime.settings, batch.id)
    mark_sent(sessions, batch.id, [A])
    receipt(sessions, batch.id, A, "delivered")
    ids = [c.id for c in callbacks(sessions, batch.id)]
    assert ids and all(c.url == url for c in callbacks(sessions, batch.id))
    client = redis.Redis.from_url(runtime.settings.redis_url)
    gate = delivery.gate_for(redis_client=client, settings=runtime.settings)
    with WebhookSender(allow=("127.0.0.1",), connect_timeout=2.0, read_timeout=5.0) as sender:
        counts = delivery.deliver(
            factory=sessions, settings=runtime.settings, sender=sender, gate=gate, callback_ids=ids
        )
    client.close()
    # On a loaded machine a POST may outlive the task's wait: its lane records it later.
    assert counts["delivered"] + counts["in_flight"] == len(ids)
    wait_for(lambda: all(c.state == "delivered" for c in callbacks(sessions, batch.id)))
    assert len(seen) == len(ids)

    headers, body = seen[0]
    assert sms.sinch_events(tenant.webhook_secret).validate_authentication_header(headers, body)
    assert not sms.sinch_events("another secret").validate_authentication_header(headers, body)
    tampered = body.replace(b"Delivered", b"Failed")
    assert not sms.sinch_events(tenant.webhook_secret).validate_authentication_header(
        headers, tampered
    )
    event = sms.sinch_events(tenant.webhook_secret).parse_event(body, headers)
    assert event.batch_id == batch.id and event.status == "Delivered" and event.code == 0
    assert event.operator_status_at is not None
    assert event.at <= datetime.now(UTC) + timedelta(seconds=5)


def test_recipients_fail_alone_with_sinch_codes(
    base_url: str, tenant: Tenant, sessions: sessionmaker[Session], runtime: Runtime
) -> None:
    sms = sdk(base_url, tenant)
    batch = sms.batches.send_sms(
        to=[A, B, C],
        from_="Acme",
        body="Hi ${name}",
        parameters={"name": {A: "Ann", C: "C" * 200}},  # B: no value, no default
        max_number_of_message_parts=1,  # C's message needs two parts
        delivery_report="per_recipient",
        event_destination_target="http://127.0.0.1:9/cb",
    )
    assert sorted(batch.to) == [A, B, C]
    report = sms.delivery_reports.get(batch_id=batch.id, report_type="full")
    by_code = {s.code: (s.status, s.recipients) for s in report.statuses}
    assert by_code == {
        400: ("Queued", [A]),
        405: ("Aborted", [B]),
        411: ("Aborted", [C]),
    }
    sent = [c.payload for c in callbacks(sessions, batch.id)]
    assert sorted((p["recipient"], p["code"], p["status"]) for p in sent) == [
        (B, 405, "Aborted"),
        (C, 411, "Aborted"),
    ]
    # The rest of the batch goes on; it completes once A is final.
    start_sending(sessions, runtime.settings, batch.id)
    mark_sent(sessions, batch.id, [A])
    receipt(sessions, batch.id, A, "delivered")
    assert sms.delivery_reports.get_for_number(batch_id=batch.id, recipient=A).code == 0


def test_replace_fails_recipients_alone_too(
    base_url: str, tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    sms = sdk(base_url, tenant)
    batch = sms.batches.send_sms(
        to=[A], from_="Acme", body="Hi", send_at=datetime.now(UTC) + timedelta(hours=1)
    )
    sms.batches.replace_sms(
        batch_id=batch.id,
        to=[A, B],
        from_="Acme",
        body="Hi ${name}",
        parameters={"name": {A: "Ann"}},
    )
    report = sms.delivery_reports.get(batch_id=batch.id, report_type="full")
    assert {(s.code, tuple(s.recipients)) for s in report.statuses} == {(400, (A,)), (405, (B,))}


def test_inbounds_list_and_get(
    base_url: str, tenant: Tenant, other_tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    number = "+447711" + str(abs(hash(tenant.id)))[:6]
    with transaction(sessions) as session:
        inbound.assign_number(session=session, number=number, account_id=tenant.id)
        (stored,) = inbound.store_many(
            session=session,
            messages=[inbound.NewInbound(A, number, "Stop", "smsc", "main", datetime.now(UTC))],
            now=utcnow(),
        )
    sms = sdk(base_url, tenant)
    got = sms.inbounds.get(inbound_id=stored.id)
    assert (got.from_, got.to, got.body) == (A, number, "Stop")
    listed = list(sms.inbounds.list(to=[number], page_size=1).iterator())
    assert [m.id for m in listed] == [stored.id]
    with pytest.raises(SmsException) as exc:
        sdk(base_url, other_tenant).inbounds.get(inbound_id=stored.id)
    assert error_of(exc)[0] == 404


def test_update_fails_recipients_alone_as_send_does(
    base_url: str, tenant: Tenant, sessions: sessionmaker[Session]
) -> None:
    sms = sdk(base_url, tenant)
    batch = sms.batches.send_sms(
        to=[A, B],
        from_="Acme",
        body="Hi ${name}",
        parameters={"name": {A: "Ann", B: "Bob"}},
        send_at=datetime.now(UTC) + timedelta(hours=1),
        delivery_report="per_recipient",
        event_destination_target="http://127.0.0.1:9/cb",
    )
    # C has no value and there is no default: only C fails (405), the update stands.
    updated = sms.batches.update_sms(batch_id=batch.id, to_add=[C])
    assert sorted(updated.to) == [A, B, C]
    # B's message now needs two parts: only B fails (411). C's failure was reported and
    # stays as it was, without a second callback.
    sms.batches.update_sms(
        batch_id=batch.id,
        parameters={"name": {A: "Ann", B: "B" * 200, C: "Cy"}},
        max_number_of_message_parts=1,
    )
    report = sms.delivery_reports.get(batch_id=batch.id, report_type="full")
    by_code = {s.code: (s.status, s.recipients) for s in report.statuses}
    assert by_code == {400: ("Queued", [A]), 405: ("Aborted", [C]), 411: ("Aborted", [B])}
    sent = [c.payload for c in callbacks(sessions, batch.id)]
    assert sorted((p["recipient"], p["code"], p["status"]) for p in sent) == [
        (B, 411, "Aborted"),
        (C, 405, "Aborted"),
    ]
    one = sms.delivery_reports.get_for_number(batch_id=batch.id, recipient=B)
    assert (one.status, one.code) == ("Aborted", 411)
    # truncate_concat cuts instead: nobody else fails.
    cut = sms.batches.update_sms(
        batch_id=batch.id, body="x" * 200, parameters={}, truncate_concat=True
    )
    assert len(cut.body) == 160
    report = sms.delivery_reports.get(batch_id=batch.id, report_type="full")
    assert {(s.code, tuple(s.recipients)) for s in report.statuses} == {
        (400, (A,)),
        (405, (C,)),
        (411, (B,)),
    }


def test_inbounds_list_takes_every_filter_the_sdk_sends(
    base_url: str, tenant: Tenant, sessions: sessionmaker[Session], runtime: Runtime
) -> None:
    number = "+447711" + str(abs(hash(tenant.id)))[:6]
    sms = sdk(base_url, tenant)

    def reply(sender: str, at: datetime) -> str:
        with transaction(sessions) as session:
            (row,) = inbound.store_many(
                session=session,
                messages=[inbound.NewInbound(sender, number, "Yes", "smsc", "main", at)],
                now=utcnow(),
            )
            return row.id

    def sent(to: str, ref: str | None, sender: str = number) -> None:
        batch = sms.batches.send_sms(to=[to], from_=sender, body="Hi", client_reference=ref)
        start_sending(sessions, runtime.settings, batch.id)
        mark_sent(sessions, batch.id, [to])

    with transaction(sessions) as session:
        inbound.assign_number(session=session, number=number, account_id=tenant.id)
    sent(A, "ref-x")
    first = reply(A, utcnow())
    # A later message to A (from the number written without +) is what A's next reply answers.
    sent(A, "ref-y", sender=number[1:])
    second = reply(A, utcnow())
    unprompted = reply(B, utcnow())
    sent(C, "ref-x")
    assert [m.id for m in sms.inbounds.list(client_reference="ref-x").content()] == [first]
    (answer,) = sms.inbounds.list(client_reference="ref-y").content()
    assert (answer.id, answer.client_reference) == (second, "ref-y")
    assert sms.inbounds.list(client_reference="ref-z").content() == []

    start = datetime.now(UTC) - timedelta(minutes=5)
    every = list(
        sms.inbounds.list(
            to=[number, "+447700900999"], start_date=start, end_date=start + timedelta(hours=1)
        ).iterator()
    )
    assert {m.id for m in every} == {first, second, unprompted}
    assert all(m.client_reference is None for m in every)
    assert sms.inbounds.list(end_date=start).content() == []
    page = sms.inbounds.list(page=1, page_size=2)
    assert len(page.content()) == 1 and page.result.count == 3


def test_batches_take_every_parameter_the_sdk_sends(base_url: str, tenant: Tenant) -> None:
    sms = sdk(base_url, tenant)
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    every: dict[str, Any] = {
        "delivery_report": "per_recipient_final",
        "send_at": later,
        "expire_at": later + timedelta(days=1),
        "event_destination_target": "http://127.0.0.1:9/cb",
        "client_reference": "every",
        "feedback_enabled": True,
        "flash_message": True,
        "max_number_of_message_parts": 2,
        "truncate_concat": True,
        "from_ton": 1,
        "from_npi": 1,
        "parameters": {"name": {A: "Ann", "default": "you"}},
    }
    sent = sms.batches.send_sms(to=[A, B], from_="Acme", body="Hi ${name}", **every)
    assert (sent.send_at, sent.expire_at) == (later, later + timedelta(days=1))
    assert (sent.event_destination_target, sent.client_reference) == (
        "http://127.0.0.1:9/cb",
        "every",
    )
    assert sent.flash_message and sent.feedback_enabled and sent.truncate_concat
    assert (sent.max_number_of_message_parts, sent.from_ton, sent.from_npi) == (2, 1, 1)
    assert sent.parameters == every["parameters"]

    window = {"start_date": later - timedelta(hours=2), "end_date": later}
    listed = sms.batches.list(page=0, page_size=5, from_=["Acme"], client_reference="every")
    assert [b.id for b in listed.content()] == [sent.id]
    assert [b.id for b in sms.batches.list(**window).content()] == [sent.id]
    assert sms.batches.list(start_date=later).content() == []

    changes = {**every, "client_reference": "changed", "from_ton": 5, "from_npi": 0}
    updated = sms.batches.update_sms(
        batch_id=sent.id, from_="Shop", to_add=[C], to_remove=[B], body="Yo ${name}", **changes
    )
    assert (updated.from_, sorted(updated.to), updated.body) == ("Shop", [A, C], "Yo ${name}")
    assert (updated.client_reference, updated.from_ton, updated.from_npi) == ("changed", 5, 0)

    replaced = sms.batches.replace_sms(batch_id=sent.id, to=[D], from_="Acme", body="R", **every)
    assert (replaced.to, replaced.body, replaced.client_reference) == ([D], "R", "every")

    dry = sms.batches.dry_run_sms(
        to=[A, B],
        from_="Acme",
        body="Hi ${name}",
        per_recipient=True,
        number_of_recipients=2,
        **every,
    )
    assert sorted((r.recipient, r.body) for r in dry.per_recipient) == [
        (A, "Hi Ann"),
        (B, "Hi you"),
    ]

    # The request-object forms send the same JSON.
    body = {"to": [A], "from": "Acme", "body": "Hi"}
    made = sms.batches.send(request=body)
    assert sms.batches.update(batch_id=made.id, request={"body": "Ho"}).body == "Ho"
    # (replace and dry_run take a model or keywords: SDK 2.3 drops a plain dict there)
    assert sms.batches.replace(batch_id=made.id, to=[A], from_="Acme", body="He").body == "He"
    dry = sms.batches.dry_run(to=[A, B], from_="Acme", body="Hi", per_recipient=True)
    assert dry.number_of_messages == 2


def test_binary_and_mms_methods_answer_clear_sinch_errors(base_url: str, tenant: Tenant) -> None:
    sms = sdk(base_url, tenant)
    batch = sms.batches.send_sms(to=[A], from_="Acme", body="Hi")
    # dry_run_binary analyses a binary batch; sending one is refused until a provider carries it.
    dry = sms.batches.dry_run_binary(
        to=[A], from_="Acme", body="SGVsbG8=", udh="050003010201", per_recipient=True
    )
    assert dry.number_of_messages == 1 and dry.per_recipient[0].encoding == "BINARY"
    binary = {"from_": "Acme", "body": "SGVsbG8=", "udh": "050003010201"}
    mms = {"from_": "Acme", "body": {"url": "https://example.com/a.png", "message": "Hi"}}
    for call, words in (
        (lambda: sms.batches.send_binary(to=[A], **binary), "mt_binary"),
        (lambda: sms.batches.replace_binary(batch_id=batch.id, to=[A], **binary), "mt_binary"),
        (lambda: sms.batches.update_binary(batch_id=batch.id, **binary), "mt_binary"),
        (lambda: sms.batches.send_mms(to=[A], **mms), "MMS"),
        (lambda: sms.batches.replace_mms(batch_id=batch.id, to=[A], **mms), "MMS"),
        (lambda: sms.batches.update_mms(batch_id=batch.id, **mms), "MMS"),
        (lambda: sms.batches.dry_run_mms(to=[A], **mms), "MMS"),
    ):
        with pytest.raises(SmsException) as exc:
            call()
        status, reply = error_of(exc)
        assert status == 400 and reply["code"].startswith("syntax_"), reply
        assert words in reply["text"], reply
    assert sms.batches.get(batch_id=batch.id).body == "Hi"


def test_delivery_reports_and_groups_take_every_parameter(
    base_url: str, tenant: Tenant, sessions: sessionmaker[Session], runtime: Runtime
) -> None:
    sms = sdk(base_url, tenant)
    batch = sms.batches.send_sms(to=[A, B], from_="Acme", body="Hi", client_reference="dr")
    start_sending(sessions, runtime.settings, batch.id)
    mark_sent(sessions, batch.id, [A, B])
    receipt(sessions, batch.id, A, "delivered")
    receipt(sessions, batch.id, B, "failed", "12")
    now = datetime.now(UTC)
    found = sms.delivery_reports.list(
        page=0,
        page_size=10,
        start_date=now - timedelta(minutes=5),
        end_date=now + timedelta(minutes=5),
        status=["FAILED", "DELIVERED"],
        code=[12],
        client_reference="dr",
    ).content()
    assert [(r.recipient, r.code) for r in found] == [(B, 12)]
    assert sms.delivery_reports.list(end_date=now - timedelta(minutes=5)).content() == []
    assert sms.delivery_reports.list(page=1, page_size=1).content()[0].recipient in (A, B)

    group = sms.groups.create(name="Team", members=[A], child_groups=None, auto_update=None)
    assert [g.id for g in sms.groups.list(page=0, page_size=1).content()] == [group.id]
    assert sms.groups.list(page=1, page_size=1).content() == []
    same = sms.groups.replace(
        group_id=group.id, name="Team", members=[A, B], child_groups=None, auto_update=None
    )
    assert same.size == 2
    changed = sms.groups.update(
        group_id=group.id,
        add=[C],
        remove=[A],
        name=None,
        add_from_group=None,
        remove_from_group=None,
        auto_update=None,
    )
    assert (changed.name, changed.size) == (None, 2)
