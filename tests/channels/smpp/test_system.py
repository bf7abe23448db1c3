"""SMPP end to end: API, a real Celery worker, the real connector process and smpp34's SMSC.

The SMSC runs in this process (scripted per test); the connector is its own
process (``dispatcher smpp-connector``), as in production; so are the send and
callback workers. SQLite, real Redis, a real webhook receiver on 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from dispatcher.batches.models import Recipient, SharedSender
from dispatcher.channels.smpp.smsc import Action, LocalSmsc, Submit, running
from dispatcher.config import Settings
from dispatcher.db import transaction
from dispatcher.inbound import service as inbound
from dispatcher.runtime import Runtime
from dispatcher.sms import parts
from dispatcher.states import RecipientStatus
from dispatcher.webhooks import sign
from tests.channels.smpp.conftest import PASSWORD
from tests.engine import system
from tests.factories import Tenant
from tests.helpers import free_port, make_settings, wait_for

pytestmark = pytest.mark.system
R = RecipientStatus
SMSC_PORT = free_port()


class Hooks(ThreadingHTTPServer):
    """Webhook receiver: keeps each request's JSON and whether its signature verified."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Hook)
        self.lock = threading.Lock()
        self.secrets: dict[str, str] = {}
        self.hits: list[tuple[str, dict[str, Any], bool]] = []

    def url(self, path: str, secret: str) -> str:
        self.secrets[path] = secret
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Hook(BaseHTTPRequestHandler):
    server: Hooks

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        secret = self.server.secrets.get(self.path, "")
        try:
            sign.verify(secret=secret, headers=dict(self.headers.items()), body=body)
            verified = True
        except sign.InvalidSignature:
            verified = False
        with self.server.lock:
            self.server.hits.append((self.path, json.loads(body), verified))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


# The SMSC never answers submits to this number (the response timer settles them).
SILENT = "447700966601"


def script(s: Submit) -> Action:
    if s.destination_addr == SILENT:
        return Action(hold=True)
    # Half the receipts reach the connector before its submit_sm_resp does.
    return Action(receipt_first=s.seq % 2 == 0)


@pytest.fixture(scope="module")
def smsc() -> Iterator[LocalSmsc]:
    with running(LocalSmsc(port=SMSC_PORT, script=script)) as server:
        yield server


@pytest.fixture(scope="module")
def smpp_settings(
    sqlite_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    smpp = {
        "carriers": {
            "local": {
                "connections": [
                    {
                        "name": "local-1",
                        "host": "127.0.0.1",
                        "port": SMSC_PORT,
                        "system_id": "dispatcher",
                        "password": PASSWORD,
                        "window": 10,
                        "throughput": 500,
                    }
                ]
            }
        },
        "response_timeout": 3,
        "request_timeout": 10,
    }
    return make_settings(
        database_url=sqlite_url,
        redis_url=redis_url,
        var=tmp_path_factory.mktemp("smppvar"),
        provider="smpp",
        smpp=smpp,
    )


@pytest.fixture(scope="module")
def live(smpp_settings: Settings) -> Iterator[Runtime]:
    with system.runtime(smpp_settings) as rt:
        yield rt


@pytest.fixture(scope="module")
def processes(
    smpp_settings: Settings,
    live: Runtime,
    smsc: LocalSmsc,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[None]:
    logs = tmp_path_factory.mktemp("smpplogs")
    connector = system.Process(
        [sys.executable, "-c", "from dispatcher.cli import main; main()", "smpp-connector"],
        smpp_settings,
        logs / "connector.log",
    )
    try:
        with system.Together() as processes:
            processes.add(connector)
            processes.add(system.worker_process(smpp_settings, logs, concurrency=2))
            processes.add(
                system.worker_process(smpp_settings, logs, name="callbacks", queues="callbacks")
            )
            processes.add(system.beat_process(smpp_settings, logs))
            wait_for(lambda: "dispatcher" in smsc.binds, timeout=30)
            yield
    finally:
        connector.stop()  # stopped already, unless starting a worker failed
        text = connector.output()
        assert PASSWORD not in text


@pytest.fixture(scope="module")
def api(live: Runtime) -> FlaskClient:
    return create_app(live.settings, runtime=live).test_client()


@pytest.fixture(scope="module")
def hooks() -> Iterator[Hooks]:
    server = Hooks()
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def recipients(sessions: sessionmaker[Session], batch_id: str) -> list[Recipient]:
    with sessions() as session:
        return list(session.scalars(select(Recipient).where(Recipient.batch_id == batch_id)))


def test_a_batch_goes_out_over_smpp_once_each_and_every_receipt_is_applied(
    processes: None, api: FlaskClient, live: Runtime, smsc: LocalSmsc
) -> None:
    tenant = Tenant(live.sessions)
    body = "Grüße from Dispatcher 😀 " + "long text " * 20
    to = [f"+4477009{i:05d}" for i in range(40)]
    reply = api.post(
        f"/xms/v1/{tenant.id}/batches",
        json={"from": "Dispatcher", "to": to, "body": body},
        headers=tenant.auth,
    )
    assert reply.status_code == 201, reply.get_json()
    batch_id = reply.get_json()["id"]

    def all_delivered() -> bool:
        rows = recipients(live.sessions, batch_id)
        return len(rows) == 40 and all(r.status == R.DELIVERED for r in rows)

    wait_for(all_delivered, timeout=60)
    rows = recipients(live.sessions, batch_id)
    expected_parts = parts.analyse(body).parts
    per_destination = Counter(s.destination_addr for s in smsc.submits)
    assert {per_destination[n.lstrip("+")] for n in to} == {expected_parts}
    # Each provider id is the message_id the SMSC gave the message's first part.
    for r in rows:
        first = smsc.accepted[r.provider_message_id or ""]
        assert first.destination_addr == r.to.lstrip("+")
        concat, _ = first.text()
        assert concat is not None and concat.number == 1


def test_an_inbound_message_reaches_the_webhook_and_the_inbounds_list(
    processes: None, api: FlaskClient, live: Runtime, smsc: LocalSmsc, hooks: Hooks
) -> None:
    dedicated, shared = Tenant(live.sessions), Tenant(live.sessions, name="shared")
    with transaction(live.sessions) as session:
        inbound.assign_number(session=session, number="447700123456", account_id=dedicated.id)
        for tenant, dialect in ((dedicated, "sinch"), (shared, "native")):
            inbound.set_webhook(
                session=session,
                account_id=tenant.id,
                url=hooks.url(f"/mo/{tenant.id}", tenant.webhook_secret),
                dialect=dialect,
                allow=live.settings.callback_allowlist,
            )
        # A reply to the shared sender "Notify" from this number is the shared account's.
        session.add(
            SharedSender(account_id=shared.id, destination="+447700900777", sender="Notify")
        )
    long_reply = "Ja, gerne! 😀 " * 12
    smsc.call(smsc.send_mo(source="+447700900555", destination="447700123456", text=long_reply))
    smsc.call(smsc.send_mo(source="+447700900777", destination="Notify", text="STOP"))

    def hit(tenant: Tenant) -> Any:
        with hooks.lock:
            return [h for h in hooks.hits if h[0] == f"/mo/{tenant.id}"]

    ((_, sinch_payload, verified),) = wait_for(lambda: hit(dedicated), timeout=30)
    assert verified
    assert sinch_payload["type"] == "mo_text"
    assert (sinch_payload["from"], sinch_payload["to"], sinch_payload["body"]) == (
        "+447700900555",
        "+447700123456",
        long_reply,
    )
    ((_, native_payload, verified),) = wait_for(lambda: hit(shared), timeout=30)
    assert verified and native_payload["body"] == "STOP"
    assert native_payload["type"] == "message.inbound"

    page = api.get(f"/xms/v1/{dedicated.id}/inbounds", headers=dedicated.auth).get_json()
    assert page["count"] == 1
    (item,) = page["inbounds"]
    assert item == {
        "type": "mo_text",
        "id": sinch_payload["id"],
        "from": "+447700900555",
        "to": "+447700123456",
        "body": long_reply,
        "received_at": sinch_payload["received_at"],
    }
    one = api.get(f"/xms/v1/{dedicated.id}/inbounds/{item['id']}", headers=dedicated.auth)
    assert one.status_code == 200 and one.get_json() == item
    filtered = api.get(
        f"/xms/v1/{dedicated.id}/inbounds?to=447700999999", headers=dedicated.auth
    ).get_json()
    assert filtered["count"] == 0
    # Another account sees none of it.
    other = api.get(f"/xms/v1/{shared.id}/inbounds/{item['id']}", headers=shared.auth)
    assert other.status_code == 404


def test_a_sinch_binary_flash_batch_reaches_the_smsc_as_binary(
    processes: None, api: FlaskClient, live: Runtime, smsc: LocalSmsc
) -> None:
    tenant = Tenant(live.sessions)
    data, udh = bytes(range(100, 230)), "050003CC0201"
    reply = api.post(
        f"/xms/v1/{tenant.id}/batches",
        json={
            "from": "12345",
            "to": ["+447700955501"],
            "type": "mt_binary",
            "body": base64.b64encode(data).decode(),
            "udh": udh,
            "flash_message": True,
            "from_ton": 6,
            "from_npi": 0,
        },
        headers=tenant.auth,
    )
    assert reply.status_code == 201, reply.get_json()
    batch_id = reply.get_json()["id"]
    wait_for(lambda: [r.status for r in recipients(live.sessions, batch_id)] == [R.DELIVERED])
    (submit,) = [s for s in smsc.submits if s.destination_addr == "447700955501"]
    # 8-bit class 0, UDHI, the UDH as given ahead of the data; the batch's TON/NPI.
    assert (submit.data_coding, submit.esm_class) == (0x14, 0x40)
    assert submit.short_message == bytes.fromhex(udh) + data
    assert (submit.source_addr, submit.source_addr_ton, submit.source_addr_npi) == ("12345", 6, 0)
    # 136 octets with the UDH: one part, as Sinch counts binary (140 per part).
    assert [r.parts for r in recipients(live.sessions, batch_id)] == [1]


def test_a_submit_without_resp_ends_unknown_and_is_never_sent_again(
    processes: None, api: FlaskClient, live: Runtime, smsc: LocalSmsc
) -> None:
    tenant = Tenant(live.sessions)
    reply = api.post(
        f"/xms/v1/{tenant.id}/batches",
        json={"from": "Dispatcher", "to": ["+" + SILENT, "+447700966602"], "body": "Hi"},
        headers=tenant.auth,
    )
    assert reply.status_code == 201, reply.get_json()
    batch_id = reply.get_json()["id"]

    def settled() -> dict[str, Recipient] | None:
        rows = {r.to: r for r in recipients(live.sessions, batch_id)}
        done = (
            rows["+" + SILENT].status == R.UNKNOWN and rows["+447700966602"].status == R.DELIVERED
        )
        return rows if done else None

    # No submit_sm_resp within response_timeout (3 s): final as unknown, not failed.
    rows = wait_for(settled, timeout=30)
    assert rows["+" + SILENT].error_code == "outcome_unknown"
    # unknown is final (no transition leaves it): one submit, never a second.
    assert [s.destination_addr for s in smsc.submits].count(SILENT) == 1
    smsc.release_held()
