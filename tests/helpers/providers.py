"""Dispatcher's API on a real port for vendors' webhooks, with queued batches and send calls."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import requests
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.serving import make_server

from api.app import create_app
from dispatcher.batches.models import Attempt, Batch, Recipient, StatusEvent
from dispatcher.channels.base import Provider
from dispatcher.db import transaction
from dispatcher.engine.sending import SendReport, send_recipients
from dispatcher.runtime import Runtime
from dispatcher.states import BatchStatus, RecipientStatus
from dispatcher.webhooks.models import Callback
from tests.factories import Tenant


def counts(reply: requests.Response) -> tuple[int, int]:
    """(applied, ignored) of a webhook's reply (durable receipts add ``pending``)."""
    body = reply.json()
    return body["applied"], body["ignored"]


class Live:
    """Dispatcher's API on a real 127.0.0.1 port, for vendors' webhooks."""

    def __init__(self, runtime: Runtime, port: int = 0) -> None:
        self.runtime = runtime
        self.app = create_app(runtime.settings, runtime=runtime)
        self.client = self.app.test_client()
        self.server = make_server("127.0.0.1", port, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def sessions(self) -> sessionmaker[Session]:
        return self.runtime.sessions

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
        self.runtime.dispose()

    def queued_batch(self, tenant: Tenant, destinations: list[str], **body: Any) -> str:
        """A batch accepted by POST /batch and due now: sending, its recipients queued."""
        payload = {
            "from": "Dispatcher",
            "message": "hello",
            "destinations": destinations,
            "callback": "http://127.0.0.1:9/hooks",
            **body,
        }
        reply = self.client.post("/batch?allowMulti=true", json=payload, headers=tenant.auth)
        assert reply.status_code == 200, reply.get_json()
        batch_id = str(reply.get_json()["identifier"])
        with transaction(self.sessions) as session:
            session.execute(
                update(Batch).where(Batch.id == batch_id).values(status=BatchStatus.SENDING)
            )
            session.execute(
                update(Recipient)
                .where(Recipient.batch_id == batch_id)
                .values(status=RecipientStatus.QUEUED)
            )
        return batch_id

    def send(self, providers: Mapping[str, Provider], batch_id: str) -> SendReport:
        """One send call, as a worker's chunk task makes it."""
        return send_recipients(
            factory=self.sessions,
            settings=self.runtime.settings,
            providers=providers,
            limiter=None,
            batch_id=batch_id,
        )

    def recipients(self, batch_id: str) -> list[Recipient]:
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(Recipient).where(Recipient.batch_id == batch_id).order_by(Recipient.seq)
                )
            )

    def events(self, recipient_id: str) -> list[str]:
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(StatusEvent.status)
                    .where(StatusEvent.recipient_id == recipient_id)
                    .order_by(StatusEvent.id)
                )
            )

    def callbacks(self, recipient_id: str) -> list[str]:
        with self.sessions() as session:
            return sorted(
                session.scalars(
                    select(Callback.event_type).where(Callback.recipient_id == recipient_id)
                )
            )

    def attempts(self, recipient_id: str) -> list[tuple[str, str, str | None]]:
        with self.sessions() as session:
            return [
                (a.channel, a.outcome, a.error)
                for a in session.scalars(
                    select(Attempt).where(Attempt.recipient_id == recipient_id).order_by(Attempt.id)
                )
            ]
