"""Concurrent intakes with one client id settle as retries or conflicts, never as errors."""

from __future__ import annotations

import threading

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.accounts.models import Account
from dispatcher.batches import service
from dispatcher.batches.models import Batch
from dispatcher.config import Settings
from dispatcher.db import transaction
from dispatcher.errors import Conflict
from tests.factories import Tenant


def _new(body: str) -> service.NewBatch:
    return service.NewBatch(
        sender="Acme",
        body=body,
        destinations=["+447700900001"],
        channels=["sms"],
        client_id="order-42",
    )


def test_concurrent_same_id_creates_one_batch(
    sessions: sessionmaker[Session], settings: Settings, tenant: Tenant
) -> None:
    results: list[object] = []
    start = threading.Barrier(4)

    def submit(body: str) -> None:
        start.wait()
        try:
            with transaction(sessions) as session:
                account = session.get(Account, tenant.id)
                assert account is not None
                intake = service.create_batch(
                    session=session, settings=settings, account=account, new=_new(body)
                )
                results.append(intake.batch.id)
        except Conflict as exc:
            results.append(exc)

    threads = [threading.Thread(target=submit, args=("same",)) for _ in range(3)]
    threads.append(threading.Thread(target=submit, args=("different",)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    ids = {r for r in results if isinstance(r, str)}
    conflicts = [r for r in results if isinstance(r, Conflict)]
    assert len(results) == 4
    with sessions() as session:
        count = session.scalar(
            select(func.count()).select_from(Batch).where(Batch.account_id == tenant.id)
        )
    assert count == 1
    assert len(ids) == 1
    # Whichever body won, the other body is a conflict.
    assert len(conflicts) in {1, 3}
