"""The batches services without HTTP: create, cancel and update (SQLite and PostgreSQL).

The HTTP tests (tests/api/) check what each dialect answers; these check what the
services write and publish, called as the views call them.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import outbox
from dispatcher.accounts.models import Account
from dispatcher.batches import service, updates
from dispatcher.batches.models import Batch, Recipient, StatusEvent
from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.errors import Conflict, NotFound, ValidationError
from dispatcher.states import BatchStatus, RecipientStatus
from tests.factories import make_account, make_batch, new_batch, numbers
from tests.helpers import RecordingPublisher
from tests.helpers.reads import account_rows, recipients

R = RecipientStatus


def _account(sessions: sessionmaker[Session], name: str = "svc") -> Account:
    with transaction(sessions) as session:
        account = make_account(session, name=name)
        session.expunge(account)
    return account


def _batch(sessions: sessionmaker[Session], batch_id: str) -> Batch:
    with sessions() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        return batch


def _events(sessions: sessionmaker[Session], batch_id: str) -> list[tuple[str, str]]:
    with sessions() as session:
        rows = session.execute(
            select(StatusEvent.recipient_id, StatusEvent.status).where(
                StatusEvent.batch_id == batch_id
            )
        )
        return sorted((r, s) for r, s in rows)


def _tasks(publisher: RecordingPublisher) -> list[tuple[str, dict[str, object]]]:
    return [(m.task, m.kwargs) for m in publisher.messages if isinstance(m, outbox.Message)]


# --- create ------------------------------------------------------------------------------


def test_fingerprints_never_change() -> None:
    # Stored with every batch: an idempotent retry after an upgrade must still match.
    full = new_batch(
        sender="Shop",
        body="Hi {name}",
        destinations=["+447700900001", "+447700900002"],
        channels=("sms", "whatsapp"),
        callback_url="https://example.com/cb",
        send_at=datetime(2030, 1, 2, 3, 4, 5),
        client_id="c1",
        options={"from_type": "custom", "nested": {"b": [1, 2]}},
        bodies=["Hi A", "Hi B"],
        max_parts=2,
        rejected={1: "404"},
    )
    plain = new_batch(destinations=("+447700900003",))
    assert (service.fingerprint(full), service.fingerprint(plain)) == (
        "573a8ccfa48eebcdd634cf57321befb34f1d171e811d4a41aa3524a82eb94dcb",
        "6063c88dbd27faaaf606ec0d3381d57468852ad3dbf385914e8d5fafd91cf4d2",
    )


def test_create_writes_the_batch_and_one_scheduled_row_per_recipient_in_order(
    sessions: sessionmaker[Session], settings: Settings, publisher: RecordingPublisher
) -> None:
    account = _account(sessions)
    destinations = numbers(5)
    with transaction(sessions) as session:
        intake = service.create_batch(
            session=session,
            settings=settings,
            account=account,
            new=new_batch(destinations=destinations, send_at=utcnow() + timedelta(days=1)),
        )
        assert intake.created
        batch_id = intake.batch.id
    batch = _batch(sessions, batch_id)
    assert (batch.account_id, batch.status, batch.recipient_count) == (
        account.id,
        BatchStatus.SCHEDULED,
        5,
    )
    rows = recipients(sessions, batch_id)
    assert [(r.seq, r.to, r.status, r.channel) for r in rows] == [
        (i, to, R.SCHEDULED, "sms") for i, to in enumerate(destinations)
    ]
    # Every other column as the model's defaults would have it (one executemany writes them).
    assert {
        (r.account_id, r.body, r.client_id, r.error_code, r.channel_index, r.attempts, r.parts)
        for r in rows
    } == {(account.id, None, None, None, 0, 0, 1)}
    assert {(r.created_at, r.updated_at) for r in rows} == {(batch.created_at, batch.created_at)}
    assert {(r.next_attempt_at, r.claimed_at, r.sent_at, r.provider) for r in rows} == {
        (None, None, None, None)
    }
    assert len({r.id for r in rows}) == 5
    assert {uuid.UUID(r.id).version for r in rows} == {7}
    # Due in a day: beyond the horizon, so nothing is handed to the broker yet.
    assert _tasks(publisher) == []


def test_create_due_now_is_queued_and_its_dispatch_published_only_after_commit(
    sessions: sessionmaker[Session], settings: Settings, publisher: RecordingPublisher
) -> None:
    account = _account(sessions)
    with transaction(sessions) as session:
        batch = service.create_batch(
            session=session, settings=settings, account=account, new=new_batch(recipients=2)
        ).batch
        assert batch.status == BatchStatus.QUEUED
        assert _tasks(publisher) == []
        batch_id = batch.id
    assert _tasks(publisher) == [("dispatch_batch", {"batch_id": batch_id})]


def test_create_with_a_client_id_is_idempotent_and_a_different_body_conflicts(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    account = _account(sessions)
    new = new_batch(recipients=3, client_id="order-17", send_at=utcnow() + timedelta(days=1))
    with transaction(sessions) as session:
        first = service.create_batch(session=session, settings=settings, account=account, new=new)
        first_id = first.batch.id
    with transaction(sessions) as session:
        again = service.create_batch(session=session, settings=settings, account=account, new=new)
        assert (again.created, again.batch.id) == (False, first_id)
    with pytest.raises(Conflict), transaction(sessions) as session:
        service.create_batch(
            session=session,
            settings=settings,
            account=account,
            new=new_batch(recipients=3, client_id="order-17", body="another body"),
        )
    assert account_rows(sessions, account.id) == (1, 3)


def test_create_refuses_an_expiry_before_the_send_time_and_writes_nothing(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    account = _account(sessions)
    send_at = utcnow() + timedelta(hours=2)
    with pytest.raises(ValidationError) as refused, transaction(sessions) as session:
        service.create_batch(
            session=session,
            settings=settings,
            account=account,
            new=new_batch(send_at=send_at, expire_at=send_at - timedelta(minutes=1)),
        )
    assert refused.value.field == "expire_at"
    assert account_rows(sessions, account.id) == (0, 0)


# --- cancel ------------------------------------------------------------------------------


def test_cancel_moves_every_unclaimed_recipient_records_events_and_revokes_tasks(
    sessions: sessionmaker[Session], settings: Settings, publisher: RecordingPublisher
) -> None:
    account = _account(sessions)
    with transaction(sessions) as session:
        batch_id = make_batch(session, settings=settings, account=account, recipients=4).id
    with transaction(sessions) as session:
        batch, cancelled = service.cancel_batch(
            session=session, account=account, batch_id=batch_id, chunk_size=settings.chunk_size
        )
        assert (batch.status, cancelled) == (BatchStatus.CANCELLED, 4)
    rows = recipients(sessions, batch_id)
    assert {r.status for r in rows} == {R.CANCELLED}
    assert _events(sessions, batch_id) == sorted((r.id, "cancelled") for r in rows)
    assert _batch(sessions, batch_id).completed_at is not None
    revokes = [m for m in publisher.messages if isinstance(m, outbox.Revoke)]
    assert len(revokes) == 1 and revokes[0].task_ids


def test_cancel_of_a_sending_batch_leaves_claimed_and_sent_recipients_alone(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    account = _account(sessions)
    with transaction(sessions) as session:
        batch = make_batch(
            session,
            settings=settings,
            account=account,
            status=BatchStatus.SENDING,
            recipients=4,
            recipient_status=R.QUEUED,
        )
        batch_id = batch.id
        rows = session.scalars(
            select(Recipient).where(Recipient.batch_id == batch_id).order_by(Recipient.seq)
        ).all()
        # A worker has claimed the first and the carrier accepted the second.
        rows[0].status, rows[1].status = R.SENDING, R.SENT
    with transaction(sessions) as session:
        _, cancelled = service.cancel_batch(session=session, account=account, batch_id=batch_id)
    assert cancelled == 2
    assert [r.status for r in recipients(sessions, batch_id)] == [
        R.SENDING,
        R.SENT,
        R.CANCELLED,
        R.CANCELLED,
    ]


@pytest.mark.parametrize(
    "status", [BatchStatus.COMPLETED, BatchStatus.CANCELLED, BatchStatus.EXPIRED]
)
def test_cancel_of_an_ended_batch_conflicts_and_changes_nothing(
    sessions: sessionmaker[Session], settings: Settings, status: BatchStatus
) -> None:
    account = _account(sessions)
    with transaction(sessions) as session:
        batch_id = make_batch(
            session, settings=settings, account=account, status=status, recipients=2
        ).id
    with pytest.raises(Conflict), transaction(sessions) as session:
        service.cancel_batch(session=session, account=account, batch_id=batch_id)
    assert _batch(sessions, batch_id).status == status
    assert {r.status for r in recipients(sessions, batch_id)} == {R.SCHEDULED}
    assert _events(sessions, batch_id) == []


def test_cancel_of_another_accounts_batch_is_not_found(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    owner, stranger = _account(sessions, "owner"), _account(sessions, "stranger")
    with transaction(sessions) as session:
        batch_id = make_batch(session, settings=settings, account=owner, recipients=2).id
    with pytest.raises(NotFound), transaction(sessions) as session:
        service.cancel_batch(session=session, account=stranger, batch_id=batch_id)
    assert _batch(sessions, batch_id).status == BatchStatus.SCHEDULED


# --- update ------------------------------------------------------------------------------


def test_update_adds_and_removes_numbers_and_keeps_seq_dense(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    account = _account(sessions)
    a, b, c, d = numbers(4)
    with transaction(sessions) as session:
        batch_id = make_batch(
            session,
            settings=settings,
            account=account,
            destinations=[a, b, c],
        ).id
    with transaction(sessions) as session:
        batch = updates.update_batch(
            session=session,
            settings=settings,
            account=account,
            batch_id=batch_id,
            fields={"body": "changed"},
            to_add=[d, a],
            to_remove=[b],
        )
        assert batch.recipient_count == 3
    rows = recipients(sessions, batch_id)
    assert [(r.seq, r.to, r.status) for r in rows] == [
        (0, a, R.SCHEDULED),
        (1, c, R.SCHEDULED),
        (2, d, R.SCHEDULED),
    ]
    assert _batch(sessions, batch_id).body == "changed"


def test_update_moving_a_queued_batch_beyond_the_horizon_schedules_it_again(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    account = _account(sessions)
    with transaction(sessions) as session:
        batch_id = make_batch(
            session,
            settings=settings,
            account=account,
            recipients=1,
            send_at=utcnow() + timedelta(seconds=settings.schedule_horizon / 2),
        ).id
    assert _batch(sessions, batch_id).status == BatchStatus.QUEUED
    later = utcnow() + timedelta(hours=2)
    with transaction(sessions) as session:
        updates.update_batch(
            session=session,
            settings=settings,
            account=account,
            batch_id=batch_id,
            fields={"send_at": later},
        )
    batch = _batch(sessions, batch_id)
    assert batch.status == BatchStatus.SCHEDULED
    assert batch.enqueued_at is None
    assert abs((batch.send_at - later).total_seconds()) < 1


def test_update_of_a_started_batch_conflicts_and_changes_nothing(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    account = _account(sessions)
    a, b = numbers(2)
    with transaction(sessions) as session:
        batch_id = make_batch(
            session,
            settings=settings,
            account=account,
            status=BatchStatus.SENDING,
            destinations=[a],
            recipient_status=R.QUEUED,
        ).id
    with pytest.raises(Conflict), transaction(sessions) as session:
        updates.update_batch(
            session=session,
            settings=settings,
            account=account,
            batch_id=batch_id,
            fields={"body": "too late"},
            to_add=[b],
        )
    assert _batch(sessions, batch_id).body == "hello"
    assert [(r.to, r.status) for r in recipients(sessions, batch_id)] == [(a, R.QUEUED)]


def test_update_that_would_leave_no_recipient_is_refused(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    account = _account(sessions)
    a = numbers(1)[0]
    with transaction(sessions) as session:
        batch_id = make_batch(session, settings=settings, account=account, destinations=[a]).id
    with pytest.raises(ValidationError), transaction(sessions) as session:
        updates.update_batch(
            session=session,
            settings=settings,
            account=account,
            batch_id=batch_id,
            fields={},
            to_remove=[a],
        )
    assert [r.to for r in recipients(sessions, batch_id)] == [a]
