"""Helpers of the Messaging Plus and 8x8 API tests: database counts, loads and error shapes."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.test import TestResponse

from dispatcher.batches.models import Batch, Recipient
from tests.factories import Tenant
from tests.helpers import RecordingPublisher
from tests.helpers.reads import account_rows as rows

# The batch id of the documentation's example request.
EXAMPLE_ID = "b2693dfe-0813-427a-bc2f-62b0e9292403"
ERROR_KEYS = {"code", "message", "errorId", "timestamp"}


def stamp(at: datetime) -> str:
    """Naive UTC as the Messaging Plus documentation writes it (no fraction, ``Z``)."""
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def load(sessions: sessionmaker[Session], batch_id: str) -> tuple[Batch, list[Recipient]]:
    """A batch and its recipients in batch order."""
    with sessions() as s:
        batch = s.get(Batch, batch_id)
        assert batch is not None, f"batch {batch_id} not stored"
        recipients = list(
            s.scalars(select(Recipient).where(Recipient.batch_id == batch_id).order_by("seq"))
        )
    return batch, recipients


def refused(response: TestResponse, status: int, *names: str) -> dict[str, Any]:
    """Assert the native error shape, the status, and that the message names ``names``."""
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert isinstance(body, dict) and set(body) == ERROR_KEYS, body
    assert isinstance(body["code"], int) and not isinstance(body["code"], bool)
    assert isinstance(body["message"], str) and body["message"]
    uuid.UUID(body["errorId"])
    assert datetime.fromisoformat(body["timestamp"]).tzinfo is not None
    for name in names:
        assert name in body["message"], (name, body["message"])
    return body


class Ledger:
    """What a tenant has in the database and what was published, to prove nothing changed."""

    def __init__(
        self, sessions: sessionmaker[Session], tenant: Tenant, publisher: RecordingPublisher
    ) -> None:
        self.sessions, self.tenant, self.publisher = sessions, tenant, publisher
        self.before = self.snapshot()

    def snapshot(self) -> tuple[tuple[int, int], int]:
        return rows(self.sessions, self.tenant.id), len(self.publisher.messages)

    def assert_unchanged(self) -> None:
        assert self.snapshot() == self.before


def minimum(**extra: Any) -> dict[str, Any]:
    """The minimum body of the Messaging Plus documentation's "Add a batch" example."""
    return {
        "from": "mplus-test",
        "message": "mplus test message!",
        "destinations": ["441111111111"],
        **extra,
    }


def numbers(n: int) -> list[str]:
    """``n`` distinct possible UK mobile numbers."""
    return [f"4477{i:08d}" for i in range(n)]
