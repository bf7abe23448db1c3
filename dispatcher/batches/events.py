"""Recording recipient status changes: one event row each, plus its callback row.

The callback is written in the same transaction as the change it reports, and
published after commit, so a change is never reported without having happened
nor happens without being reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import ColumnElement, DateTime, Insert, String, Table, insert, literal, select
from sqlalchemy.orm import Session

from dispatcher import metrics, outbox
from dispatcher.batches.models import Batch, Recipient, StatusEvent
from dispatcher.db import insert_many, new_ids, one_of
from dispatcher.states import RecipientStatus
from dispatcher.webhooks.builders import callbacks_for
from dispatcher.webhooks.models import Callback
from dispatcher.webhooks.payloads import PendingCallback

# What a bulk UPDATE ... RETURNING must return for a Change (in its fields' order).
CHANGE_COLUMNS = (
    Recipient.id,
    Recipient.to,
    Recipient.channel,
    Recipient.client_id,
    Recipient.error_code,
    Recipient.error_text,
    Recipient.batch_id,
    Recipient.provider_message_id,
)


class Change(NamedTuple):
    """One recipient's move into a new status, with what the client is told of it.

    A named tuple, not a frozen dataclass: one is made per recipient moved (three
    times per recipient sent and delivered), straight from a returned row.
    """

    recipient_id: str
    to: str
    channel: str | None
    client_id: str | None = None
    error_code: str | None = None
    error_text: str | None = None
    # Where it belongs and its message id, for the mover (not part of the event).
    batch_id: str | None = None
    provider_message_id: str | None = None

    @classmethod
    def of(cls, recipient: Recipient) -> Change:
        """From a loaded recipient."""
        return cls(
            recipient.id,
            recipient.to,
            recipient.channel,
            recipient.client_id,
            recipient.error_code,
            recipient.error_text,
            recipient.batch_id,
            recipient.provider_message_id,
        )


def record(
    *,
    session: Session,
    batch: Batch,
    status: RecipientStatus,
    changes: Sequence[Change],
    at: datetime,
    copy: bool = False,
) -> list[str]:
    """Write the status events and callback rows for ``changes``; returns callback ids.

    ``copy``: the recipients' rows hold the changes' values now (the caller just moved
    them), so the events are copied from them in one INSERT ... SELECT instead of
    sending every row's values over.
    """
    if not changes:
        return []
    if copy:
        moved = one_of(session, Recipient.id, [c.recipient_id for c in changes])
        session.connection().execute(_copy_events(status, at, moved))
    else:
        # Core executemany: no ORM bookkeeping for rows nobody loads back.
        session.connection().execute(
            insert(StatusEvent),
            [
                {
                    "recipient_id": c.recipient_id,
                    "batch_id": batch.id,
                    "status": status.value,
                    "channel": c.channel,
                    "error_code": c.error_code,
                    "error_text": c.error_text,
                    "at": at,
                }
                for c in changes
            ],
        )
    metrics.status_changed(session=session, batch=batch, status=status, changes=changes, at=at)
    callbacks = callbacks_for(batch=batch, status=status, changes=changes, at=at)
    if not callbacks:
        return []
    ids = new_ids(len(callbacks))
    _insert_callbacks(session, batch, callbacks, ids, at)
    outbox.defer(session, outbox.Message(outbox.TaskName.DELIVER_CALLBACKS, {"callback_ids": ids}))
    return ids


def _copy_events(status: RecipientStatus, at: datetime, moved: ColumnElement[bool]) -> Insert:
    """INSERT ... SELECT of one status event per recipient that ``moved`` selects, from its row."""
    columns = ("recipient_id", "batch_id", "status", "channel", "error_code", "error_text", "at")
    rows = select(
        Recipient.id,
        Recipient.batch_id,
        literal(status.value, String),
        Recipient.channel,
        Recipient.error_code,
        Recipient.error_text,
        literal(at, DateTime),
    ).where(moved)
    return insert(StatusEvent).from_select(columns, rows)


def _insert_callbacks(
    session: Session,
    batch: Batch,
    callbacks: Sequence[PendingCallback],
    ids: list[str],
    at: datetime,
) -> None:
    """The callback rows, in one statement over their columns (``db.insert_many``).

    A Core executemany of a dict per row spent more CPU on its parameters than the
    database on the rows (three callbacks per recipient). The ids are time-ordered
    (``new_ids``): random ones landed on random pages of the primary key's index.
    """
    rows: dict[str, Sequence[Any]] = {
        "id": ids,
        "recipient_id": [cb.recipient_id for cb in callbacks],
        "payload": [cb.payload for cb in callbacks],
    }
    same: dict[str, Any] = {
        "account_id": batch.account_id,
        "batch_id": batch.id,
        "state": "pending",
        "attempts": 0,
        "next_attempt_at": at,
        "enqueued_at": at,
        "created_at": at,
    }
    for key in ("event_type", "url"):
        values = [getattr(cb, key) for cb in callbacks]
        if values.count(values[0]) == len(values):
            same[key] = values[0]
        else:
            rows[key] = values
    insert_many(session, cast(Table, Callback.__table__), rows=rows, same=same)
