"""transition_recipients with per-row values (``each``): every value lands exactly on the
row it names, only rows in an allowed status move (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.batches.models import Recipient
from dispatcher.batches.transitions import transition_recipients
from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.states import RecipientStatus
from tests.factories import sending_batch

R = RecipientStatus

# Quotes, backslashes, JSON's own escapes, text beyond the BMP; a NUL goes another way.
TEXTS = ["plain-1", 'quo"te\\back', "new\nline \u2028 \\u0041", "emoji \U0001f600 é"]


@pytest.mark.parametrize("texts", [TEXTS, [*TEXTS, "nul\x00inside"]], ids=["json", "nul"])
def test_per_row_values_land_on_their_rows_and_only_sending_ones_move(
    sessions: sessionmaker[Session], settings: Settings, texts: list[str]
) -> None:
    if "\x00" in texts[-1] and not settings.database_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's text holds no NUL")
    with transaction(sessions) as session:
        batch_id, ids = sending_batch(
            session,
            settings=settings,
            name="each",
            recipients=len(texts) + 1,
            recipient_status=R.SENDING,
        )
        # One named row was cancelled meanwhile: it must not move or take its value.
        session.execute(update(Recipient).where(Recipient.id == ids[0]).values(status=R.CANCELLED))
    each = {
        rid: {"provider_message_id": text, "provider": "sim"}
        for rid, text in zip(ids, texts, strict=False)
    }
    with transaction(sessions) as session:
        moved = transition_recipients(
            session=session, to=R.SENT, at=utcnow(), each=each, current=[R.SENDING], record=False
        )
    assert sorted(m.recipient_id for m in moved) == sorted(ids[1 : len(texts)])
    with sessions() as session:
        rows = {
            r.id: (r.status, r.provider_message_id, r.provider)
            for r in session.scalars(select(Recipient).where(Recipient.batch_id == batch_id))
        }
    assert rows[ids[0]] == (R.CANCELLED, None, None)
    for rid, text in zip(ids[1 : len(texts)], texts[1:], strict=True):
        assert rows[rid] == (R.SENT, text, "sim")
    assert rows[ids[-1]] == (R.SENDING, None, None)  # not named: not moved


def test_per_row_numbers_and_times_land_only_on_rows_that_move(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    """Values the join cannot carry (a fallback's channel index, attempts, times) are
    written row by row before the status moves: never on a row that does not move."""
    with transaction(sessions) as session:
        batch_id, ids = sending_batch(
            session, settings=settings, name="each-num", recipients=4, recipient_status=R.SENDING
        )
        session.execute(update(Recipient).where(Recipient.id == ids[0]).values(status=R.CANCELLED))
    at = utcnow().replace(microsecond=0)
    each = {
        rid: {
            "channel_index": i + 1,
            "attempts": i + 2,
            "next_attempt_at": at + timedelta(seconds=i),
            "error_code": f"code-{i}",
        }
        for i, rid in enumerate(ids[:3])
    }
    with transaction(sessions) as session:
        moved = transition_recipients(
            session=session, to=R.QUEUED, at=at, each=each, current=[R.SENDING], record=False
        )
    assert sorted(m.recipient_id for m in moved) == sorted(ids[1:3])
    with sessions() as session:
        rows = {
            r.id: (r.status, r.channel_index, r.attempts, r.next_attempt_at, r.error_code)
            for r in session.scalars(select(Recipient).where(Recipient.batch_id == batch_id))
        }
    assert rows[ids[0]] == (R.CANCELLED, 0, 0, None, None)
    for i in (1, 2):
        assert rows[ids[i]] == (R.QUEUED, i + 1, i + 2, at + timedelta(seconds=i), f"code-{i}")
    assert rows[ids[3]] == (R.SENDING, 0, 0, None, None)


@pytest.mark.parametrize("narrowed", ["where", "ids"])
def test_per_row_values_take_no_other_conditions(
    sessions: sessionmaker[Session], settings: Settings, narrowed: str
) -> None:
    """A row failing a ``where`` would take its values without moving (they are written
    first, by id and status): the combination is refused, nothing is written."""
    with transaction(sessions) as session:
        batch_id, ids = sending_batch(
            session,
            settings=settings,
            name=f"each-{narrowed}",
            recipients=2,
            recipient_status=R.SENDING,
        )
    each = {rid: {"channel_index": 5, "attempts": 7} for rid in ids}
    narrow: dict[str, Any] = (
        {"where": [Recipient.id != ids[1]]} if narrowed == "where" else {"ids": ids[:1]}
    )
    with transaction(sessions) as session, pytest.raises(ValueError, match="no where or ids"):
        transition_recipients(
            session=session, to=R.QUEUED, at=utcnow(), each=each, current=[R.SENDING], **narrow
        )
    with sessions() as session:
        rows = session.execute(
            select(Recipient.status, Recipient.channel_index, Recipient.attempts).where(
                Recipient.batch_id == batch_id
            )
        ).all()
    assert [tuple(r) for r in rows] == [(R.SENDING, 0, 0)] * 2
