"""Channel fallback after acceptance: a channel's webhook says it could not carry a sent message.

WhatsApp (131026, 131047 as a ``failed`` status), Twilio (63016 and the like in a
status callback) and RBM (a message revoked undelivered after its TTL) say so only
after the send was accepted, when the recipient is ``sent``. Such a receipt moves
the recipient on as a refusal at send time does: ``sent -> queued`` on the next
channel of its list, handed to the send path again (a ``send_recipients`` task:
tokens, FIFO turn, claim), or ``failed`` with the code kept when no channel is left.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import ColumnElement, insert, literal_column, select, update
from sqlalchemy.orm import Session

from dispatcher import outbox
from dispatcher.batches import events
from dispatcher.batches.models import LATE_CHANNEL_FAILURE, Attempt, Batch, Recipient
from dispatcher.batches.transitions import transition_batch, transition_recipients
from dispatcher.engine.scheduling import complete_if_done
from dispatcher.outbox import TaskName
from dispatcher.states import BatchStatus, RecipientStatus

R, B = RecipientStatus, BatchStatus
# What the recipients of a stopped batch become when they would be queued again.
STOPPED = {B.CANCELLED: R.CANCELLED, B.EXPIRED: R.EXPIRED}
# What a recipient moved on from a sent message stops carrying: that message's id,
# its provider and when it went (the attempt row keeps the id). So a receipt for
# the old message can never match the next channel's send, and reports and inbound
# replies do not show the old message as the current one.
FORGET_SENT = {"provider_message_id": None, "provider": None, "sent_at": None}


@dataclass(frozen=True)
class Failure:
    """A receipt saying that the channel could not carry the message it had accepted."""

    provider_message_id: str
    error_code: str | None
    error_text: str | None


def requeue_values(
    index: int,
    channel: str,
    attempts: int,
    next_at: datetime | None,
    enqueued_at: datetime | None,
    code: str | None,
    text: str | None,
) -> dict[str, Any]:
    """The columns of a recipient queued again on ``channel``, ``index`` in its batch's list."""
    return {
        "channel_index": index,
        "channel": channel,
        "attempts": attempts,
        "next_attempt_at": next_at,
        "enqueued_at": enqueued_at,
        "claimed_at": None,
        "error_code": code,
        "error_text": text,
    }


def stop_requeued(
    *, session: Session, batch: Batch, batch_status: BatchStatus, ids: Sequence[str], now: datetime
) -> bool:
    """Cancel (or expire) recipients just queued again if their batch stopped; whether it had."""
    stop = STOPPED.get(batch_status)
    if stop is None or not ids:
        return False
    transition_recipients(
        session=session, to=stop, current=(R.QUEUED,), ids=ids, at=now, batch=batch
    )
    return True


def fall_back(
    *,
    session: Session,
    where: Sequence[ColumnElement[bool]],
    failures: Sequence[Failure],
    now: datetime,
) -> set[str]:
    """Move the ``sent`` recipients ``where`` names that ``failures`` concern to their next channel.

    One with no channel left fails with the provider's code and text. Returns the
    provider message ids that matched a sent recipient (the others are left to the
    caller: early, or late for a message that moved on already).
    """
    by_ref = {f.provider_message_id: f for f in failures}
    rows = session.execute(
        select(
            Recipient.id,
            Recipient.batch_id,
            Recipient.provider_message_id,
            Recipient.channel,
            Recipient.channel_index,
        ).where(*where, Recipient.status == R.SENT)
    ).all()
    per_batch: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        if row.provider_message_id in by_ref:
            per_batch[row.batch_id].append(row)
    matched: set[str] = set()
    # Batches in a fixed order, each row taken before its recipients (as cancel does).
    for batch_id in sorted(per_batch):
        matched |= _fall_back_in(
            session=session, batch_id=batch_id, rows=per_batch[batch_id], by_ref=by_ref, now=now
        )
    return matched


def _fall_back_in(
    *,
    session: Session,
    batch_id: str,
    rows: Sequence[Any],
    by_ref: Mapping[str, Failure],
    now: datetime,
) -> set[str]:
    batch_status = session.execute(
        update(Batch).where(Batch.id == batch_id).values(progress_at=now).returning(Batch.status)
    ).scalar_one()
    # Read again, locked: the same failure reported twice (a vendor retrying its webhook)
    # may have moved a row on, and its next channel sent it, since fall_back read it
    # (PostgreSQL). Such a row is not this message's any more: moving it would send again.
    current = dict(
        session.execute(
            select(Recipient.id, Recipient.provider_message_id)
            .where(Recipient.id.in_([row.id for row in rows]), Recipient.status == R.SENT)
            .with_for_update()
        ).all()
    )
    rows = [row for row in rows if current.get(row.id) == row.provider_message_id]
    if not rows:
        return set()
    batch = session.get(Batch, batch_id)
    assert batch is not None
    requeue: dict[str, Mapping[str, Any]] = {}
    fail: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        failure = by_ref[row.provider_message_id]
        nxt = row.channel_index + 1
        if nxt < len(batch.channels):
            requeue[row.id] = FORGET_SENT | requeue_values(
                nxt, batch.channels[nxt], 0, None, now, failure.error_code, failure.error_text
            )
        else:
            fail[row.id] = {"error_code": failure.error_code, "error_text": failure.error_text}
    move = partial(transition_recipients, session=session, current=(R.SENT,), at=now, batch=batch)
    failed = move(to=R.FAILED, each=fail)
    queued = move(to=R.QUEUED, each=requeue, record=False)
    by_id = {row.id: row for row in rows}
    # Reported under the channel that failed, with its code: the client sees that
    # attempt end, then the next channel's own events.
    events.record(
        session=session,
        batch=batch,
        status=R.QUEUED,
        changes=[m._replace(channel=by_id[m.recipient_id].channel) for m in queued],
        at=now,
    )
    moved = [by_id[m.recipient_id] for m in (*failed, *queued)]
    if moved:
        session.connection().execute(
            insert(Attempt),
            [
                {
                    "recipient_id": row.id,
                    "channel": row.channel,
                    "outcome": LATE_CHANNEL_FAILURE,
                    "error_code": by_ref[row.provider_message_id].error_code,
                    "error": by_ref[row.provider_message_id].error_text,
                    "provider_message_id": row.provider_message_id,
                    "at": now,
                }
                for row in moved
            ],
        )
    ids = [m.recipient_id for m in queued]
    if ids:
        _send_again(session=session, batch=batch, batch_status=batch_status, ids=ids, now=now)
    return {row.provider_message_id for row in moved}


def _send_again(
    *, session: Session, batch: Batch, batch_status: BatchStatus, ids: list[str], now: datetime
) -> None:
    """Hand recipients just queued again to the send path, unless their batch is over."""
    late = now >= batch.expire_at and batch_status not in STOPPED
    if batch_status == B.COMPLETED:
        # Every recipient had been handed over; this one has a channel to go yet (or,
        # too late for it, makes the batch end expired below).
        transition_batch(
            session=session,
            batch_id=batch.id,
            to=B.SENDING,
            current=(B.COMPLETED,),
            values={"completed_at": None},
            at=now,
        )
    if stop_requeued(
        session=session,
        batch=batch,
        # Too late to send: expired, as a stopped batch's recipients are.
        batch_status=B.EXPIRED if late else batch_status,
        ids=ids,
        now=now,
    ):
        if late:
            # Expired by expire_at before a provider accepted them on this channel: the
            # batch ends as the sweep would end it (expired), once nothing is in flight.
            complete_if_done(session=session, batch_id=batch.id, now=now)
        return
    outbox.defer(
        session,
        outbox.Message(TaskName.SEND_RECIPIENTS, {"batch_id": batch.id, "recipient_ids": ids}),
    )


def moved_on(*, session: Session, refs: Sequence[str]) -> set[str]:
    """Which of ``refs`` name a rich message that a late failure moved on from."""
    if not refs:
        return set()
    return set(
        session.scalars(
            select(Attempt.provider_message_id).where(
                # A literal, not a parameter: so the planners can use the partial index.
                Attempt.outcome == literal_column(f"'{LATE_CHANNEL_FAILURE}'"),
                Attempt.provider_message_id.in_(list(refs)),
            )
        )
    )
