"""Held receipts applied when they are due, by their wake-ups alone (receipts/wake.py).

No beat runs here, so nothing polls the simulator's receipts: each recipient ends
``delivered`` only if the group that handed it over asked for the receipts task
(real Celery worker, real Redis, SQLite).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from dispatcher.batches.models import Recipient
from dispatcher.config import Settings
from dispatcher.runtime import Runtime
from dispatcher.states import RecipientStatus
from tests.engine import system
from tests.factories import Tenant
from tests.helpers import wait_for
from tests.helpers.engine import numbers, send

pytestmark = pytest.mark.system


def test_receipts_are_applied_when_due_without_beat(
    sys_settings: Settings, logs: Path, live: Runtime, live_sessions: sessionmaker[Session]
) -> None:
    settings = sys_settings.replace(simulator={"receipt_delay": 0.3}, chunk_size=100)
    api = create_app(live.settings, runtime=live).test_client()
    tenant = Tenant(live_sessions)

    def rows() -> list[tuple[RecipientStatus, object, object]]:
        with live_sessions() as session:
            found = session.execute(
                select(Recipient.status, Recipient.sent_at, Recipient.updated_at).where(
                    Recipient.batch_id == batch_id
                )
            ).all()
        return [tuple(r) for r in found]

    with system.worker(settings, logs, name="wake", concurrency=2):
        batch_id = send(api, tenant, numbers("+44770042", 300))
        wait_for(lambda: [s for s, _, _ in rows()] == [RecipientStatus.DELIVERED] * 300, timeout=60)
    # Loosely (timings are the bench's): each receipt applied within seconds of its due time.
    lags = [(done - sent).total_seconds() for _, sent, done in rows()]  # type: ignore[operator]
    assert max(lags) < 10, max(lags)
