"""Receipts end to end: real Celery worker and beat processes, real Redis, SQLite.

A carrier answers fast: its receipts come while the worker is still handing the
group over, before the outcome is recorded, and a worker may die between the
hand-off and the record. Every recipient must still end final (delivered when
the receipt says so), and one with no receipt at all must end ``unknown`` by the
deadline, so the batch's Sinch summary goes out.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from dispatcher.batches.models import Attempt, Batch, Recipient
from dispatcher.channels.simulator import Simulator
from dispatcher.config import Settings
from dispatcher.receipts.models import PendingReceipt
from dispatcher.runtime import Runtime
from dispatcher.states import BatchStatus, RecipientStatus
from tests.engine import system
from tests.factories import Tenant
from tests.helpers import wait_for
from tests.helpers.engine import numbers, send

pytestmark = pytest.mark.system
R = RecipientStatus


# Each test starts its own worker with its carrier's rules.
SYS_SETTINGS = {"receipt_retention": 120}


class Receiver(ThreadingHTTPServer):
    """Collects the JSON bodies POSTed to it (webhooks)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.bodies: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hooks"

    def received(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.bodies)


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.bodies.append(json.loads(body))
        self.send_response(204)
        self.end_headers()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def api(live: Runtime) -> FlaskClient:
    return create_app(live.settings, runtime=live).test_client()


@pytest.fixture(scope="module")
def ledger(live: Runtime) -> Simulator:
    return Simulator(redis_client=live.redis, rules={})


@pytest.fixture(scope="module", autouse=True)
def processes(scheduler: system.Process) -> Iterator[None]:
    yield


def counts(sessions: sessionmaker[Session], batch_id: str) -> dict[str, int]:
    with sessions() as session:
        rows = session.execute(
            select(Recipient.status, func.count())
            .where(Recipient.batch_id == batch_id)
            .group_by(Recipient.status)
        ).all()
    return {RecipientStatus(s).value: n for s, n in rows}


def all_in(sessions: sessionmaker[Session], batch_id: str, status: RecipientStatus, n: int) -> bool:
    return counts(sessions, batch_id) == {status.value: n}


def stored_receipts(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(PendingReceipt)) or 0


def handed_over_once(ledger: Simulator, sessions: sessionmaker[Session], batch_id: str) -> bool:
    with sessions() as session:
        ids = set(session.scalars(select(Recipient.id).where(Recipient.batch_id == batch_id)))
    per = {k.split(":")[0]: v for k, v in ledger.handoffs().items() if k.split(":")[0] in ids}
    return len(per) == len(ids) and set(per.values()) == {1}


@pytest.mark.parametrize(
    ("receipt_delay", "count"),
    [
        (0.5, 500),  # the reported case: 500 recipients, 20 ms a hand-off, receipts after 0.5 s
        (0.0, 150),  # receipts due the moment the carrier accepts
    ],
)
def test_receipts_that_come_before_the_record_are_all_applied(
    api: FlaskClient,
    live_sessions: sessionmaker[Session],
    ledger: Simulator,
    sys_settings: Settings,
    logs: Path,
    receipt_delay: float,
    count: int,
) -> None:
    fast = sys_settings.replace(
        simulator={"latency_ms": 20, "receipt_delay": receipt_delay},
        chunk_size=500,
        # The whole group is handed off under one claim, as with the default lease.
        send_lease=60,
    )
    tenant = Tenant(live_sessions)
    with system.worker(fast, logs, name=f"fast-{count}", concurrency=2):
        batch_id = send(api, tenant, numbers("+44770040", count))
        # Receipts do arrive while the group is still being handed off.
        wait_for(lambda: stored_receipts(live_sessions) > 0, timeout=30)
        wait_for(lambda: all_in(live_sessions, batch_id, R.DELIVERED, count), timeout=60)
    assert handed_over_once(ledger, live_sessions, batch_id)
    with live_sessions() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None and batch.status == BatchStatus.COMPLETED


def test_a_worker_killed_between_hand_off_and_record_loses_no_receipt(
    api: FlaskClient,
    live_sessions: sessionmaker[Session],
    ledger: Simulator,
    sys_settings: Settings,
    logs: Path,
) -> None:
    """kill -9 while a group is handed over but not recorded; its receipts come meanwhile."""
    # 100 hand-offs of 40 ms under one claim: the first 50 are in the carrier's ledger
    # about 2 s before the group is recorded. The doomed worker's long lease lets it
    # hand the whole group over; the fresh worker's short one reclaims it soon.
    slow = sys_settings.replace(
        simulator={"latency_ms": 40, "receipt_delay": 0.2}, send_lease=30, receipt_retention=120
    )
    tenant = Tenant(live_sessions)

    def handed_over_unrecorded() -> set[str]:
        with live_sessions() as session:
            claimed = set(
                session.scalars(
                    select(Recipient.id).where(
                        Recipient.batch_id == batch_id, Recipient.status == R.SENDING
                    )
                )
            )
        return claimed & {k.split(":")[0] for k in ledger.handoffs()}

    with system.worker(slow, logs, name="doomed", concurrency=1) as doomed:
        batch_id = send(api, tenant, numbers("+44770041", 300))
        wait_for(lambda: len(handed_over_unrecorded()) >= 20, timeout=30, interval=0.02)
        doomed.kill_group(signal.SIGKILL)
        doomed.proc.wait(timeout=10)
    lost = handed_over_unrecorded()
    assert lost  # handed over, never recorded: only reclaim can settle these
    # A fresh worker: its receipts task stores what came for the lost claims, reclaim
    # finds them accepted after the lease and applies the stored receipts with that.
    fresh = sys_settings.replace(simulator={"receipt_delay": 0.2})
    with system.worker(fresh, logs, name="fresh", concurrency=2):
        wait_for(lambda: all_in(live_sessions, batch_id, R.DELIVERED, 300), timeout=120)
    assert handed_over_once(ledger, live_sessions, batch_id)
    with live_sessions() as session:
        reclaimed = set(
            session.scalars(
                select(Attempt.recipient_id).where(
                    Attempt.recipient_id.in_(lost), Attempt.outcome == "reclaim:accepted"
                )
            )
        )
    assert reclaimed == lost


def test_no_receipt_by_the_deadline_ends_unknown_and_the_sinch_summary_fires(
    api: FlaskClient,
    live_sessions: sessionmaker[Session],
    sys_settings: Settings,
    logs: Path,
    receiver: Receiver,
) -> None:
    silent = sys_settings.replace(
        simulator={"receipt_delay": 3600},  # the carrier never reports
        receipt_deadline=2,
    )
    tenant = Tenant(live_sessions)
    with system.worker(silent, logs, name="silent", queues="dispatch,send,callbacks"):
        reply = api.post(
            f"/xms/v1/{tenant.id}/batches",
            json={
                "from": "12345",
                "to": numbers("+44770042", 3),
                "body": "hello",
                "delivery_report": "summary",
                "callback_url": receiver.url,
            },
            headers=tenant.auth,
        )
        assert reply.status_code == 201, reply.get_json()
        batch_id = reply.get_json()["id"]

        def summary() -> dict[str, Any] | None:
            return next((b for b in receiver.received() if b.get("batch_id") == batch_id), None)

        # Loose: the deadline is 2 s and the sweep runs every 5 s; the rest is a loaded machine.
        report = wait_for(summary, timeout=120)
    assert report["type"] == "delivery_report_sms"
    assert report["statuses"] == [{"code": 0, "status": "Unknown", "count": 3}]
    assert all_in(live_sessions, batch_id, R.UNKNOWN, 3)
    with live_sessions() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None and batch.status == BatchStatus.COMPLETED
