"""Callback rows written with a status change: one per recipient moved, each row holding
exactly its own payload, URL and event type (SQLite and PostgreSQL)."""

from __future__ import annotations

import uuid

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.batches import events
from dispatcher.batches.models import Batch, Recipient
from dispatcher.batches.transitions import transition_recipients
from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.states import RecipientStatus
from dispatcher.webhooks.models import Callback
from dispatcher.webhooks.payloads import PendingCallback, native
from tests.factories import sending_batch

R = RecipientStatus

# Quotes, backslashes, JSON's own escapes and text beyond the BMP, in the client's ids.
TEXTS = ["plain-1", 'quo"te\\back', "new\nline \u2028 \\u0041", "emoji \U0001f600 é"]


def _sending_batch(session: Session, settings: Settings, size: int) -> tuple[str, list[str]]:
    return sending_batch(
        session,
        settings=settings,
        name="events",
        recipients=size,
        recipient_status=R.SENDING,
        callback_url="https://hooks.example.com/status",
    )


def test_each_recipient_moved_gets_its_own_callback_row(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    with transaction(sessions) as session:
        batch_id, ids = _sending_batch(session, settings, len(TEXTS) + 1)
        for rid, text in zip(ids, TEXTS, strict=False):
            session.execute(update(Recipient).where(Recipient.id == rid).values(client_id=text))
        # Cancelled meanwhile: it does not move, so nothing is reported for it.
        session.execute(update(Recipient).where(Recipient.id == ids[-1]).values(status=R.CANCELLED))
    at = utcnow().replace(microsecond=123000)
    each = {
        rid: {"provider_message_id": f"ref-{i}", "provider": "sim"} for i, rid in enumerate(ids)
    }
    with transaction(sessions) as session:
        moved = transition_recipients(
            session=session, to=R.SENT, at=at, each=each, current=[R.SENDING]
        )
        batch = session.get(Batch, batch_id)
        assert batch is not None
        expected = {
            cb.recipient_id or "": cb
            for cb in native(batch=batch, status=R.SENT, changes=moved, at=at)
        }
    assert sorted(expected) == sorted(ids[:-1])
    with sessions() as session:
        rows = session.scalars(select(Callback).where(Callback.batch_id == batch_id)).all()
        assert sorted(r.recipient_id or "" for r in rows) == sorted(ids[:-1])
        for row in rows:
            cb = expected[row.recipient_id or ""]
            assert (row.url, row.event_type, row.payload) == (cb.url, cb.event_type, cb.payload)
            assert (row.state, row.attempts, row.next_attempt_at) == ("pending", 0, at)
            assert uuid.UUID(row.id).version == 7
    assert [expected[rid].payload["id"] for rid in ids[: len(TEXTS)]] == TEXTS


def test_rows_whose_url_and_event_type_differ_keep_their_own(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    with transaction(sessions) as session:
        batch_id, ids = _sending_batch(session, settings, 3)
        batch = session.get(Batch, batch_id)
        assert batch is not None
        callbacks = [
            PendingCallback(f"https://hooks.example.com/{i}", f"kind.{i}", {"n": i, "t": t}, rid)
            for i, (rid, t) in enumerate(zip(ids, TEXTS, strict=False))
        ]
        at = utcnow()
        events._insert_callbacks(session, batch, callbacks, [str(uuid.uuid4()) for _ in ids], at)
    with sessions() as session:
        rows = session.scalars(select(Callback).where(Callback.batch_id == batch_id)).all()
        got = {r.recipient_id: (r.url, r.event_type, r.payload) for r in rows}
    assert got == {cb.recipient_id: (cb.url, cb.event_type, cb.payload) for cb in callbacks}
