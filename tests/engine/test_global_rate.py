"""N worker processes together send at the configured rate, not N times it."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.batches.models import Recipient
from dispatcher.config import Settings
from dispatcher.runtime import Runtime
from tests.engine import system
from tests.factories import Tenant as Account
from tests.helpers import wait_for
from tests.helpers.engine import numbers, send

pytestmark = pytest.mark.system
RATE = 25.0
COUNT = 150


def test_four_worker_processes_share_one_account_rate(
    live: Runtime, live_sessions: sessionmaker[Session], sys_settings: Settings, logs: Path
) -> None:
    from api.app import create_app

    # Small chunks so that every worker process has work at the same time.
    small = sys_settings.replace(chunk_size=10)
    api = create_app(small, runtime=live).test_client()
    account = Account(live_sessions, rate=RATE)
    with (
        system.worker(small, logs, name="rate-a", concurrency=2),
        system.worker(small, logs, name="rate-b", concurrency=2),
    ):
        batch_id = send(api, account, numbers("+44770057", COUNT))

        def sent() -> int:
            with live_sessions() as session:
                return int(
                    session.scalar(
                        select(func.count()).where(
                            Recipient.batch_id == batch_id, Recipient.sent_at.is_not(None)
                        )
                    )
                    or 0
                )

        wait_for(lambda: sent() == COUNT, timeout=COUNT / RATE * 3)
    with live_sessions() as session:
        first, last = session.execute(
            select(func.min(Recipient.sent_at), func.max(Recipient.sent_at)).where(
                Recipient.batch_id == batch_id
            )
        ).one()
    achieved = (COUNT - 1) / (last - first).total_seconds()
    # Four processes unthrottled would reach several times the rate; allow noise only.
    assert achieved == pytest.approx(RATE, rel=0.2), achieved
