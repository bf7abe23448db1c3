"""N worker processes together send at the configured rate, not N times it."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.batches.models import Recipient
from dispatcher.config import Settings
from dispatcher.db import utcnow
from dispatcher.engine import sending
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
    with system.Together() as processes:
        processes.add(system.worker_process(small, logs, name="rate-a", concurrency=2))
        processes.add(system.worker_process(small, logs, name="rate-b", concurrency=2))
        posted = utcnow()
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

        # A bound on the time, not a measure of the rate (bench-rate measures accuracy).
        wait_for(lambda: sent() == COUNT, timeout=COUNT / RATE * 10)
    with live_sessions() as session:
        last = session.scalar(
            select(func.max(Recipient.sent_at)).where(Recipient.batch_id == batch_id)
        )
    assert last is not None
    # Tokens are booked GROUP at a time on the account's one schedule, from after the POST,
    # and each booking pushes the next slot GROUP / RATE on; a recipient is handed over
    # (and recorded) no sooner than its group's slot. So however loaded the machine, the
    # last group went (COUNT - GROUP) / RATE after the POST at the earliest. Four processes
    # each keeping the rate alone would be done in a quarter of that.
    group = sending.group_size(settings=small, rate=RATE)
    floor = (COUNT - group) / RATE
    took = (last - posted).total_seconds()
    print(f"\n{COUNT} sent {took:.2f} s after the POST (no sooner than {floor:.2f} s)")
    assert took >= floor * 0.98, (took, floor)
