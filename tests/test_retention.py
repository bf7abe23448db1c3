"""The retention purge (SQLite and PostgreSQL): old finished batches go entirely, in small
steps; live, recent or still-reporting batches are left exactly as they were."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import retention
from dispatcher.accounts.models import Account
from dispatcher.batches import service
from dispatcher.batches.models import Attempt, Batch, Recipient, StatusEvent
from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.states import BatchStatus, CallbackState, RecipientStatus
from dispatcher.webhooks.models import Callback
from tests.factories import make_account, make_batch, new_batch

R = RecipientStatus
RECIPIENTS = 5
HOOK = "https://example.com/hook"
# What the client asked for (part of the request fingerprint); the rows are backdated after.
SEND_AT = datetime(2030, 1, 1)


def _account(sessions: sessionmaker[Session]) -> Account:
    with transaction(sessions) as session:
        account = make_account(session, name="retention")
        session.expunge(account)
    return account


def _finished_batch(
    sessions: sessionmaker[Session],
    settings: Settings,
    account: Account,
    *,
    age_days: float,
    status: BatchStatus = BatchStatus.COMPLETED,
    callback_states: tuple[CallbackState, ...] = (CallbackState.DELIVERED, CallbackState.DEAD),
    client_id: str | None = None,
) -> str:
    """A batch that sent (or not) ``age_days`` ago, with every kind of row it leaves behind."""
    then = utcnow() - timedelta(days=age_days)
    with transaction(sessions) as session:
        batch = make_batch(
            session,
            settings=settings,
            account=account,
            recipients=RECIPIENTS,
            send_at=SEND_AT,
            callback_url=HOOK,
            client_id=client_id,
        )
        finished = status not in (BatchStatus.SCHEDULED, BatchStatus.QUEUED, BatchStatus.SENDING)
        session.execute(
            update(Batch)
            .where(Batch.id == batch.id)
            .values(
                status=status,
                created_at=then,
                send_at=then,
                completed_at=then + timedelta(minutes=5) if finished else None,
            )
        )
        rstatus = R.DELIVERED if finished else R.QUEUED
        session.execute(
            update(Recipient).where(Recipient.batch_id == batch.id).values(status=rstatus)
        )
        ids = session.scalars(select(Recipient.id).where(Recipient.batch_id == batch.id)).all()
        for i, rid in enumerate(ids):
            session.add(Attempt(recipient_id=rid, channel="sms", outcome="accepted", at=then))
            for s in ("queued", "sent", "delivered"):
                session.add(StatusEvent(recipient_id=rid, batch_id=batch.id, status=s, at=then))
            session.add(
                Callback(
                    account_id=account.id,
                    batch_id=batch.id,
                    recipient_id=rid,
                    event_type="message.status",
                    url=HOOK,
                    payload={"n": i},
                    state=callback_states[i % len(callback_states)],
                    created_at=then,
                )
            )
        session.flush()
        return batch.id


def _rows(sessions: sessionmaker[Session], batch_id: str) -> dict[str, int]:
    """Rows of every table that belong to the batch."""
    with sessions() as session:
        rids = select(Recipient.id).where(Recipient.batch_id == batch_id).scalar_subquery()

        def count(model: type, *where: Any) -> int:
            return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)

        return {
            "batches": count(Batch, Batch.id == batch_id),
            "recipients": count(Recipient, Recipient.batch_id == batch_id),
            "attempts": count(Attempt, Attempt.recipient_id.in_(rids)),
            "status_events": count(StatusEvent, StatusEvent.batch_id == batch_id),
            "callbacks": count(Callback, Callback.batch_id == batch_id),
        }


def _purge(sessions: sessionmaker[Session], settings: Settings) -> retention.PurgeReport:
    return retention.purge(
        factory=sessions,
        settings=settings.replace(retention_days=30, retention_chunk=2),
        now=utcnow(),
        max_batches=1000,
    )


def test_purge_removes_old_finished_batches_entirely_and_leaves_the_rest(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    account = _account(sessions)
    old = {
        status: _finished_batch(sessions, settings, account, age_days=40, status=status)
        for status in (BatchStatus.COMPLETED, BatchStatus.CANCELLED, BatchStatus.EXPIRED)
    }
    kept = {
        "recent": _finished_batch(sessions, settings, account, age_days=20),
        "live": _finished_batch(
            sessions, settings, account, age_days=40, status=BatchStatus.SENDING
        ),
        "callback owed": _finished_batch(
            sessions,
            settings,
            account,
            age_days=40,
            callback_states=(CallbackState.DELIVERED, CallbackState.PENDING),
        ),
        "callback held": _finished_batch(
            sessions, settings, account, age_days=40, callback_states=(CallbackState.HELD,)
        ),
    }
    before = {name: _rows(sessions, bid) for name, bid in kept.items()}
    assert all(_rows(sessions, bid)["attempts"] == RECIPIENTS for bid in old.values())

    report = _purge(sessions, settings)

    for status, bid in old.items():
        assert _rows(sessions, bid) == dict.fromkeys(before["recent"], 0), status
    assert {name: _rows(sessions, bid) for name, bid in kept.items()} == before
    assert report.batches >= len(old)
    assert report.rows["recipients"] >= len(old) * RECIPIENTS
    assert report.rows["status_events"] >= len(old) * RECIPIENTS * 3


def test_each_step_deletes_at_most_a_chunk(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    account = _account(sessions)
    bid = _finished_batch(sessions, settings, account, age_days=40)
    before = utcnow() - timedelta(days=30)
    steps: list[dict[str, int]] = []
    while not steps or "batches" not in steps[-1]:
        with transaction(sessions) as session:
            steps.append(
                retention.purge_step(session=session, batch_id=bid, before=before, chunk=2)
            )
        assert steps[-1], "a purgeable batch must make progress"
        assert len(steps) < 50
    assert all(n <= 2 for step in steps for table, n in step.items() if table != "attempts")
    # Recipients (with their attempts) first, the batch row last.
    assert list(steps[0]) == ["attempts", "recipients"]
    assert steps[-1] == {"batches": 1}
    assert sum(s.get("recipients", 0) for s in steps) == RECIPIENTS
    assert sum(s.get("status_events", 0) for s in steps) == 3 * RECIPIENTS
    assert sum(s.get("callbacks", 0) for s in steps) == RECIPIENTS


def test_a_step_leaves_a_batch_that_became_live_again_alone(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    account = _account(sessions)
    bid = _finished_batch(sessions, settings, account, age_days=40)
    with transaction(sessions) as session:
        # A receipt arrived after the purge listed the batch: a callback is owed again.
        session.execute(
            update(Callback)
            .where(Callback.batch_id == bid, Callback.state == CallbackState.DEAD)
            .values(state=CallbackState.PENDING)
        )
    before = _rows(sessions, bid)
    with transaction(sessions) as session:
        step = retention.purge_step(
            session=session, batch_id=bid, before=utcnow() - timedelta(days=30), chunk=2
        )
    assert step == {}
    assert _rows(sessions, bid) == before


def test_client_ids_stay_taken_within_the_retention_window(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    account = _account(sessions)
    recent = _finished_batch(sessions, settings, account, age_days=29, client_id="keep-me-29")
    gone = _finished_batch(sessions, settings, account, age_days=31, client_id="old-one-31")
    _purge(sessions, settings)

    def post(client_id: str) -> tuple[str, bool]:
        with transaction(sessions) as session:
            acc = session.get(Account, account.id)
            assert acc is not None
            new = new_batch(
                recipients=RECIPIENTS, send_at=SEND_AT, callback_url=HOOK, client_id=client_id
            )
            result = service.create_batch(session=session, settings=settings, account=acc, new=new)
            return result.batch.id, result.created

    # Within the window, a retry is answered with the original batch (nothing sent again).
    assert post("keep-me-29") == (recent, False)
    assert _rows(sessions, gone)["batches"] == 0
    new_id, created = post("old-one-31")
    assert created and new_id != gone


def test_retention_zero_keeps_everything(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    account = _account(sessions)
    bid = _finished_batch(sessions, settings, account, age_days=4000)
    before = _rows(sessions, bid)
    report = retention.purge(
        factory=sessions, settings=settings.replace(retention_days=0), now=utcnow()
    )
    assert report.rows == {}
    assert _rows(sessions, bid) == before


def test_settings_refuse_a_negative_retention_and_beat_runs_the_purge(settings: Settings) -> None:
    from dispatcher.config import ConfigError
    from workers.celery_app import create_celery

    with pytest.raises(ConfigError):
        settings.replace(retention_days=-1)
    with pytest.raises(ConfigError):
        settings.replace(retention_chunk=0)
    app = create_celery(settings.replace(retention_interval=120))
    entry = app.conf.beat_schedule["purge-retention"]
    assert (entry["task"], entry["schedule"]) == ("purge_retention", 120)
    app.loader.import_default_modules()  # workers.tasks, as a worker does at start
    assert "purge_retention" in app.tasks


def test_a_batch_whose_messages_still_wait_for_receipts_is_kept_past_a_short_retention(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    """One day of retention, but a carrier may report a message for receipt_deadline
    (3 days): a batch completed two days ago still has a recipient to report. Purged,
    its final status (delivered, or unknown at the deadline) would never be reported."""
    account = _account(sessions)
    waiting = _finished_batch(sessions, settings, account, age_days=2)
    gone = _finished_batch(sessions, settings, account, age_days=4)
    with transaction(sessions) as session:
        session.execute(
            update(Recipient)
            .where(Recipient.batch_id == waiting, Recipient.seq == 0)
            .values(status=R.SENT)
        )
    before = _rows(sessions, waiting)
    retention.purge(
        factory=sessions,
        settings=settings.replace(retention_days=1, retention_chunk=2),
        now=utcnow(),
        max_batches=1000,
    )
    assert _rows(sessions, waiting) == before
    assert _rows(sessions, gone)["batches"] == 0  # past the deadline: nothing left to report
