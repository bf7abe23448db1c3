"""The receipts service without HTTP: what ``accept`` changes (SQLite and PostgreSQL).

tests/api/test_dlr.py covers ``POST /dlr/<provider>``; these call the service the
way that view and the simulator do.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.batches.models import Recipient, StatusEvent
from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.receipts.service import Receipt, accept
from dispatcher.states import RecipientStatus
from dispatcher.webhooks.models import Callback
from tests.factories import sending_batch

R = RecipientStatus


def _batch_with_sent(
    sessions: sessionmaker[Session], settings: Settings, count: int, *, callback: bool = False
) -> tuple[str, list[str]]:
    """A sending batch whose recipients the carrier accepted: ``sent``, with provider ids."""
    with transaction(sessions) as session:
        batch_id, ids = sending_batch(
            session,
            settings=settings,
            name="receipts",
            recipients=count,
            recipient_status=R.SENT,
            callback_url="https://receiver.example/dlr" if callback else None,
        )
        session.execute(
            update(Recipient)
            .where(Recipient.batch_id == batch_id)
            .values(provider_message_id="pm-" + Recipient.id, sent_at=utcnow())
        )
        return batch_id, ids


def _apply(sessions: sessionmaker[Session], *receipts: Receipt) -> int:
    with transaction(sessions) as session:
        return accept(
            session=session, provider="carrier", receipts=list(receipts), now=utcnow()
        ).applied


def _state(sessions: sessionmaker[Session], recipient_id: str) -> tuple[str, str | None]:
    with sessions() as session:
        row = session.get(Recipient, recipient_id)
        assert row is not None
        return row.status, row.error_code


def _events(sessions: sessionmaker[Session], batch_id: str) -> list[tuple[str, str]]:
    with sessions() as session:
        rows = session.execute(
            select(StatusEvent.recipient_id, StatusEvent.status).where(
                StatusEvent.batch_id == batch_id
            )
        )
        return sorted((r, s) for r, s in rows)


def test_a_receipt_finalises_a_sent_recipient_once_with_its_event_and_callback(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    batch_id, (first, second) = _batch_with_sent(sessions, settings, 2, callback=True)
    assert _apply(sessions, Receipt(f"pm-{first}", "delivered")) == 1
    assert _state(sessions, first) == (R.DELIVERED, None)
    assert _state(sessions, second) == (R.SENT, None)
    assert _events(sessions, batch_id) == [(first, "delivered")]
    with sessions() as session:
        reported = session.scalars(
            select(Callback.recipient_id).where(Callback.batch_id == batch_id)
        )
        assert list(reported) == [first]
    # The carrier retries the same receipt: nothing changes a second time.
    assert _apply(sessions, Receipt(f"pm-{first}", "delivered")) == 0
    assert _events(sessions, batch_id) == [(first, "delivered")]


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        ("failed", "E42", (R.FAILED, "E42")),
        ("failed", None, (R.FAILED, "failed")),
        ("expired", None, (R.EXPIRED, "expired")),
    ],
)
def test_a_failing_receipt_keeps_the_carriers_code_or_names_the_outcome(
    sessions: sessionmaker[Session],
    settings: Settings,
    status: str,
    code: str | None,
    expected: tuple[str, str],
) -> None:
    _, (rid,) = _batch_with_sent(sessions, settings, 1)
    assert _apply(sessions, Receipt(f"pm-{rid}", status, code, "carrier said so")) == 1
    assert _state(sessions, rid) == expected


def test_a_final_recipient_is_never_moved_by_a_later_receipt(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    batch_id, (rid,) = _batch_with_sent(sessions, settings, 1)
    assert _apply(sessions, Receipt(f"pm-{rid}", "failed", "E1")) == 1
    assert _apply(sessions, Receipt(f"pm-{rid}", "delivered")) == 0
    assert _state(sessions, rid) == (R.FAILED, "E1")
    assert _events(sessions, batch_id) == [(rid, "failed")]


def test_one_call_applies_many_outcomes_and_skips_statuses_it_does_not_know(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    batch_id, ids = _batch_with_sent(sessions, settings, 4)
    applied = _apply(
        sessions,
        Receipt(f"pm-{ids[0]}", "delivered"),
        Receipt(f"pm-{ids[1]}", "delivered"),
        Receipt(f"pm-{ids[2]}", "failed", "E9"),
        Receipt(f"pm-{ids[3]}", "accepted-by-smsc"),
    )
    assert applied == 3
    assert [_state(sessions, rid)[0] for rid in ids] == [R.DELIVERED, R.DELIVERED, R.FAILED, R.SENT]
    assert _events(sessions, batch_id) == sorted(
        [(ids[0], "delivered"), (ids[1], "delivered"), (ids[2], "failed")]
    )
