"""A callback worker stopped warm while its lanes' POSTs are in flight: a real worker
process, a real slow receiver on 127.0.0.1, SIGTERM to the worker's main process alone
(what ``dispatcher run`` and docker-compose send).

The deliver task stops waiting for a slow receiver and returns with its callbacks in
flight; the pool process then leaves. It must let those POSTs finish and record them,
not leave them 'delivering' until the lease and POST them again.
"""

from __future__ import annotations

import signal
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.config import Settings
from dispatcher.db import new_id, transaction, utcnow
from dispatcher.runtime import Runtime
from dispatcher.webhooks import scheduling
from dispatcher.webhooks.models import Callback
from tests.engine import system
from tests.factories import Tenant
from tests.helpers import in_thread, wait_for

pytestmark = pytest.mark.system

CALLBACKS = 4
# Longer than the task waits for a lane that finishes nothing (callback_task_wait plus
# delivery.STALL), so the task returns with every callback in flight; well below the
# time the stopping pool process waits for them (delivery.STOP_WAIT).
ANSWER_AFTER = 1.5


class SlowReceiver(ThreadingHTTPServer):
    """Answers every POST 200 after ANSWER_AFTER seconds; counts webhook-ids as they arrive."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), SlowHandler)
        self.lock = threading.Lock()
        self.ids: Counter[str] = Counter()
        self.all_arrived = threading.Event()
        self.answered = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hooks/{uuid.uuid4().hex}"


class SlowHandler(BaseHTTPRequestHandler):
    server: SlowReceiver

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        srv = self.server
        with srv.lock:
            srv.ids[self.headers.get("webhook-id", "")] += 1
            if sum(srv.ids.values()) >= CALLBACKS:
                srv.all_arrived.set()
        threading.Event().wait(ANSWER_AFTER)  # the receiver's own slowness
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
        with srv.lock:
            srv.answered += 1


# The task waits a fifth of a second for its lanes, then leaves them in flight.
SYS_SETTINGS = {"callback_task_wait": 0.2}


@pytest.fixture
def receiver() -> Iterator[SlowReceiver]:
    with in_thread(SlowReceiver()) as srv:
        yield srv


def add_callbacks(sessions: sessionmaker[Session], tenant: Tenant, url: str) -> list[str]:
    """Due pending callbacks to ``url``, published as one deliver task after the commit."""
    now = utcnow()
    ids = [new_id() for _ in range(CALLBACKS)]
    with transaction(sessions) as session:
        for callback_id in ids:
            session.add(
                Callback(
                    id=callback_id,
                    account_id=tenant.id,
                    event_type="message.delivered",
                    url=url,
                    payload={"type": "message.delivered", "to": "+447700900123"},
                    state="pending",
                    attempts=0,
                    next_attempt_at=now,
                    enqueued_at=now,
                    created_at=now,
                )
            )
        session.flush()
        scheduling.publish(session, ids, size=CALLBACKS)
    return ids


def test_a_warm_stop_records_the_callbacks_in_flight_and_posts_none_again(
    sys_settings: Settings, live: Runtime, logs: Path, receiver: SlowReceiver
) -> None:
    tenant = Tenant(live.sessions)
    worker = system.worker_process(sys_settings, logs, name="drain", queues="callbacks")
    try:
        ids = add_callbacks(live.sessions, tenant, receiver.url)
        assert receiver.all_arrived.wait(timeout=60), worker.output()[-3000:]

        worker.proc.send_signal(signal.SIGTERM)  # the main process alone: a warm shutdown
        worker.proc.wait(timeout=60)
    finally:
        worker.stop()

    log = worker.output()
    assert f"'in_flight': {CALLBACKS}" in log, log[-3000:]  # the task left them in flight
    assert worker.returncode == 0, log[-3000:]
    with live.sessions() as session:
        rows = session.scalars(select(Callback).where(Callback.id.in_(ids))).all()
        assert (
            sorted((r.state, r.attempts, r.last_status) for r in rows)
            == [("delivered", 1, 200)] * CALLBACKS
        )
    assert receiver.ids == Counter(dict.fromkeys(ids, 1))
    wait_for(lambda: receiver.answered == CALLBACKS, timeout=10)
