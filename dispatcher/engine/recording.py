"""Recording hand-off outcomes: a pure decision per recipient, then one write per status.

:func:`decide` turns a claimed row and what its provider answered into a
:class:`Decision` (no database); :func:`apply` writes a group's decisions with
one transition per target status, records their events, and applies any
receipt that arrived before the outcome was recorded.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import DateTime, String, insert, literal, select, update
from sqlalchemy.orm import Session

from dispatcher.batches.models import Attempt, Batch, Recipient
from dispatcher.batches.transitions import transition_recipients
from dispatcher.channels.base import Outcome, SendResult
from dispatcher.config import Settings
from dispatcher.db import one_of
from dispatcher.engine.fallback import requeue_values, stop_requeued
from dispatcher.receipts import service as receipts
from dispatcher.states import RecipientStatus

R = RecipientStatus
# The order groups are written in (the batch row is always taken first).
ORDER = (R.SENT, R.QUEUED, R.FAILED, R.EXPIRED, R.UNKNOWN)


class Decision(NamedTuple):
    """What to write for one claimed recipient: its next status and the columns that go with it.

    A named tuple, not a dataclass: one is made per recipient sent, and a frozen
    dataclass's ``__init__`` cost more than the decision itself.
    """

    recipient_id: str
    status: RecipientStatus
    values: Mapping[str, Any]
    # Whether the move is reported (an event and callbacks); a re-queue is not.
    report: bool
    # Queued to be tried again at once by the running task (fallback, never handed over).
    again: bool = False
    # What the hand-off answered on which channel, and when (None: never handed over).
    result: SendResult | None = None
    channel: str | None = None
    at: datetime | None = None

    @property
    def attempt(self) -> dict[str, Any] | None:
        """The Attempt row to write (None: never handed over).

        Built only when written: a sent row's attempt is copied inside the database.
        """
        r = self.result
        if r is None:
            return None
        return {
            "recipient_id": self.recipient_id,
            "channel": self.channel,
            "outcome": r.outcome.value,
            "error_code": r.error_code,
            "error": r.error_text,
            "provider_message_id": r.provider_message_id,
            "at": self.at,
        }


def retry_delay(*, settings: Settings, attempt: int, retry_after: float | None) -> float:
    """Seconds before the next try on the same channel (the schedule's last step repeats)."""
    schedule = settings.send_retry_schedule or (60.0,)
    delay = schedule[min(attempt, len(schedule)) - 1]
    return max(delay, retry_after or 0.0)


def decide(
    row: Any,
    result: SendResult | None,
    *,
    channels: Sequence[str],
    expire_at: datetime,
    settings: Settings,
    now: datetime,
    provider: str | None = None,
) -> Decision:
    """The outcome of one hand-off: sent, retry later, fall back, expire or fail.

    ``row`` is a claimed recipient (``sending.CLAIM_COLUMNS``); ``provider`` the
    name of the provider that carried it (receipts match on it). A None result
    was never handed over (lease deadline): queued again as it was.
    """
    if result is None:
        return Decision(
            row.id,
            R.QUEUED,
            requeue_values(row.channel_index, row.channel, row.attempts - 1, None, now, None, None),
            report=False,
            again=True,
        )
    tried = (result, row.channel, now)
    code, text = result.error_code, result.error_text
    if result.outcome is Outcome.ACCEPTED:
        values = {
            "provider_message_id": result.provider_message_id,
            "provider": provider,
            "sent_at": now,
            "claimed_at": None,
            "error_code": None,
            "error_text": None,
        }
        return Decision(row.id, R.SENT, values, True, False, *tried)
    failure = {"claimed_at": None, "error_code": code, "error_text": text}
    if result.outcome is Outcome.TRANSIENT:
        delay = retry_delay(settings=settings, attempt=row.attempts, retry_after=result.retry_after)
        at = now + timedelta(seconds=delay)
        if at >= expire_at:
            return Decision(row.id, R.EXPIRED, failure, True, False, *tried)
        values = requeue_values(row.channel_index, row.channel, row.attempts, at, None, code, text)
        return Decision(row.id, R.QUEUED, values, False, False, *tried)
    if result.outcome is Outcome.UNKNOWN:
        return Decision(row.id, R.UNKNOWN, failure, True, False, *tried)
    if result.outcome is Outcome.CHANNEL and row.channel_index + 1 < len(channels):
        nxt = row.channel_index + 1
        # Immediate fallback: the running chunk picks it up again, so it stays enqueued.
        values = requeue_values(nxt, channels[nxt], 0, None, now, code, text)
        return Decision(row.id, R.QUEUED, values, False, True, *tried)
    return Decision(row.id, R.FAILED, failure, True, False, *tried)


def apply(
    *,
    session: Session,
    batch: Batch,
    decisions: Sequence[Decision],
    claimed_at: datetime,
    now: datetime,
) -> set[str]:
    """Write ``decisions`` (one transition per target status); returns those to try again now.

    The batch row is taken first: that orders this transaction with a cancel
    (which changes that row first too), so a cancel committed before us is seen
    here and one after us finds whatever we queue again. Re-queued rows of a
    batch that stopped meanwhile are cancelled (or expired) in this transaction.
    Only rows still holding the claim made at ``claimed_at`` move: one reclaimed
    and claimed again while this worker stalled is the newer claim's to record.
    """
    batch_status = session.execute(
        update(Batch).where(Batch.id == batch.id).values(progress_at=now).returning(Batch.status)
    ).scalar_one()
    groups: dict[RecipientStatus, dict[str, Mapping[str, Any]]] = defaultdict(dict)
    for d in decisions:
        groups[d.status][d.recipient_id] = d.values
    # A sent row's attempt is copied from the row once it moved (see _copy_attempts);
    # any other attempt, and that of a sent row that did not move, is written as is.
    tried = [d for d in decisions if d.result is not None and d.status is not R.SENT]
    again = {d.recipient_id for d in decisions if d.again}
    sent_by: dict[str, list[str]] = defaultdict(list)
    for status in ORDER:
        each = groups.get(status)
        if not each:
            continue
        moved = transition_recipients(
            session=session,
            to=status,
            current=(R.SENDING,),
            each=each,
            at=now,
            batch=batch,
            record=status is not R.QUEUED,
            claimed_at=claimed_at,
        )
        if status is R.SENT:
            for m in moved:
                provider = each[m.recipient_id]["provider"]
                if provider and m.provider_message_id:
                    sent_by[provider].append(m.provider_message_id)
            copied = _copy_attempts(session, [m.recipient_id for m in moved], now)
            tried += [
                d
                for d in decisions
                if d.status is R.SENT and d.result is not None and d.recipient_id not in copied
            ]
        # The batch stopped while these were out: queued again just now, they are
        # cancelled (or expired) in the same transaction instead of tried again.
        if status is R.QUEUED and stop_requeued(
            session=session,
            batch=batch,
            batch_status=batch_status,
            ids=[m.recipient_id for m in moved],
            now=now,
        ):
            again = set()
    attempts = [a for d in tried if (a := d.attempt) is not None]
    if attempts:
        session.connection().execute(insert(Attempt), attempts)
    for provider, refs in sent_by.items():
        receipts.settle(session=session, provider=provider, refs=refs, now=now)
    return again & set(groups.get(R.QUEUED, {}))


def _copy_attempts(session: Session, ids: list[str], now: datetime) -> set[str]:
    """The accepted attempts of rows just moved to sent, in one INSERT ... SELECT; their ids.

    Such a row holds its attempt's channel and message id now, so nothing per
    row is sent over (an executemany's parameters were a tenth of recording).
    """
    if not ids:
        return set()
    columns = ("recipient_id", "channel", "outcome", "provider_message_id", "at")
    rows = select(
        Recipient.id,
        Recipient.channel,
        literal(Outcome.ACCEPTED.value, String),
        Recipient.provider_message_id,
        literal(now, DateTime),
    ).where(one_of(session, Recipient.id, ids))
    session.connection().execute(insert(Attempt).from_select(columns, rows))
    return set(ids)
