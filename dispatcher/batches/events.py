"""Recording recipient status changes: one event row each, plus its callback row.

The callback is written in the same transaction as the change it reports, and
published after commit, so a change is never reported without having happened
nor happens without being reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import Table
from sqlalchemy.orm import Session

from dispatcher import metrics, outbox
from dispatcher.batches.models import Batch, Recipient, StatusEvent
from dispatcher.db import insert_many, new_ids
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
) -> list[str]:
    """Write the status events and callback rows for ``changes``; returns callback ids."""
    if not changes:
        return []
    # The events, from the changes in one statement (db.insert_many): a group's events
    # share all but the recipient, so on SQLite they are one INSERT over a JSON array of
    # ids, 2.3 us an event, where copying them from the rows just moved looked each row
    # up again by its id (4.1 us).
    same: dict[str, Any] = {"batch_id": batch.id, "status": status.value, "at": at}
    rows = {"recipient_id": [c.recipient_id for c in changes]}
    rows |= _columns(changes, ("channel", "error_code", "error_text"), same)
    insert_many(session, cast(Table, StatusEvent.__table__), rows=rows, same=same)
    metrics.status_changed(session=session, batch=batch, status=status, changes=changes, at=at)
    callbacks = callbacks_for(batch=batch, status=status, changes=changes, at=at)
    if not callbacks:
        return []
    ids = new_ids(len(callbacks))
    _insert_callbacks(session, batch, callbacks, ids, at)
    outbox.defer(session, outbox.Message(outbox.TaskName.DELIVER_CALLBACKS, {"callback_ids": ids}))
    return ids


def _columns(
    rows: Sequence[tuple[Any, ...]], keys: Sequence[str], same: dict[str, Any]
) -> dict[str, list[Any]]:
    """Each of ``keys`` (named tuple fields): into ``same`` when every row has one value,
    else returned as its column of per-row values (``db.insert_many``'s two halves)."""
    varying: dict[str, list[Any]] = {}
    for key in keys:
        values = [getattr(row, key) for row in rows]
        if values.count(values[0]) == len(values):
            same[key] = values[0]
        else:
            varying[key] = values
    return varying


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
    rows |= _columns(callbacks, ("event_type", "url"), same)
    insert_many(session, cast(Table, Callback.__table__), rows=rows, same=same)
