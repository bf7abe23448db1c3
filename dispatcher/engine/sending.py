"""Sending: token, claim, hand-off, record; for one chunk or a list of recipients.

This is the one service that owns several transactions, on purpose: a claim
(``queued`` -> ``sending``) is committed BEFORE the provider is called, and the
outcome is recorded in a second transaction after it. A worker that dies in
between leaves rows in ``sending`` that :func:`reclaim_stale` settles by asking
the provider, so nothing is lost and nothing is handed over twice.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, bindparam, insert, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import metrics
from dispatcher.accounts.models import Account
from dispatcher.batches import events
from dispatcher.batches.models import Attempt, Batch, Recipient
from dispatcher.channels.base import Lookup, OutboundMessage, Outcome, Provider, SendResult
from dispatcher.config import Settings
from dispatcher.db import read_transaction, transaction, utcnow
from dispatcher.engine.scheduling import complete_if_done, expire_recipients
from dispatcher.ratelimit import Limit, RateLimiter
from dispatcher.states import BatchStatus, RecipientStatus

R = RecipientStatus
recipients = cast(Table, Recipient.__table__)

CLAIM_COLUMNS = (
    Recipient.id,
    Recipient.to,
    Recipient.body,
    Recipient.channel,
    Recipient.channel_index,
    Recipient.attempts,
    Recipient.client_id,
)


@dataclass
class SendReport:
    """What one call did, for logs and task results."""

    claimed: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe form (Celery task results)."""
        return {"claimed": self.claimed, "outcomes": dict(self.outcomes)}


def group_size(*, settings: Settings, rate: float | None) -> int:
    """How many tokens to take at once: about 0.2 s of the rate, so cancels stay prompt."""
    if not rate:
        return settings.chunk_size
    return max(1, min(settings.chunk_size, int(rate * 0.2)))


def account_rate(settings: Settings, account: Account) -> float:
    """Messages per second for the account (0: unlimited)."""
    return account.rate_limit if account.rate_limit is not None else settings.default_account_rate


def send_recipients(
    *,
    factory: sessionmaker[Session],
    settings: Settings,
    providers: Mapping[str, Provider],
    limiter: RateLimiter | None,
    batch_id: str,
    seq_range: tuple[int, int] | None = None,
    recipient_ids: Sequence[str] | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> SendReport:
    """Send every due, queued recipient of the batch in ``seq_range`` or ``recipient_ids``.

    Per group: tokens, then one claim transaction, the hand-off outside any
    transaction, then one record transaction. Without a rate limit the group is
    chosen inside the claim itself, so a chunk costs two write transactions a group.
    """
    report = SendReport()
    with read_transaction(factory) as session:
        batch = session.get(Batch, batch_id)
        account = session.get(Account, batch.account_id) if batch else None
    if batch is None or account is None or batch.status != BatchStatus.SENDING:
        return report
    rate = account_rate(settings, account)
    channel_rates = [settings.channel_rates.get(ch, 0.0) for ch in batch.channels]
    limited = limiter is not None and bool(rate or any(channel_rates))
    limit = group_size(
        settings=settings, rate=min(r for r in (rate, *channel_rates) if r) if limited else None
    )
    while True:
        now = clock()
        if now >= batch.expire_at:
            with transaction(factory) as session:
                only = list(recipient_ids) if recipient_ids is not None else None
                expire_recipients(session=session, batch=batch, now=now, ids=only)
                complete_if_done(session=session, batch_id=batch.id, now=now)
            return report
        due = [
            Recipient.batch_id == batch_id,
            Recipient.status == R.QUEUED,
            or_(Recipient.next_attempt_at.is_(None), Recipient.next_attempt_at <= now),
        ]
        if seq_range is not None:
            due += [Recipient.seq >= seq_range[0], Recipient.seq < seq_range[1]]
        if recipient_ids is not None:
            due.append(Recipient.id.in_(recipient_ids))
        next_group = select(Recipient.id).where(*due).order_by(Recipient.seq).limit(limit)
        if limited:
            # Tokens come before the claim, so the group is read (without the write lock) first.
            with read_transaction(factory) as session:
                candidates = session.execute(next_group.add_columns(Recipient.channel)).all()
            if not candidates:
                break
            _take_tokens(limiter, settings, account.id, rate, [ch for _, ch in candidates])
            target = Recipient.id.in_([rid for rid, _ in candidates])
        else:
            target = Recipient.id.in_(next_group.scalar_subquery())
        with transaction(factory) as session:
            claimed = session.execute(
                update(Recipient)
                .where(target, Recipient.status == R.QUEUED)
                .values(
                    status=R.SENDING,
                    # Stamped now, after any wait for tokens: the lease starts here.
                    claimed_at=clock(),
                    attempts=Recipient.attempts + 1,
                    updated_at=now,
                )
                .returning(*CLAIM_COLUMNS)
            ).all()
        if not claimed:
            if limited:
                continue  # the candidates were taken or cancelled meanwhile: read again
            break
        report.claimed += len(claimed)
        messages = [
            OutboundMessage(
                recipient_id=row.id,
                channel=row.channel,
                to=row.to,
                sender=batch.sender,
                body=row.body or batch.body,
                attempt=row.attempts,
                template=batch.options.get("whatsapp_template"),
            )
            for row in claimed
        ]
        results = _hand_over(
            providers, messages, deadline=time.monotonic() + settings.send_lease / 2
        )
        for result in results:
            report.outcomes[result.outcome.value if result else "deferred"] += 1
        # A short group with nothing to try again at once was the last one.
        last = len(claimed) < limit
        with transaction(factory) as session:
            again = record_results(
                session=session,
                settings=settings,
                batch=batch,
                channels=batch.channels,
                claimed=claimed,
                results=results,
                now=clock(),
            )
            if last and not again:
                complete_if_done(session=session, batch_id=batch_id, now=clock())
                return report
    with transaction(factory) as session:
        complete_if_done(session=session, batch_id=batch_id, now=clock())
    return report


def _take_tokens(
    limiter: RateLimiter | None,
    settings: Settings,
    account_id: str,
    rate: float,
    channels: list[str],
) -> None:
    if limiter is None:
        return
    counts: dict[str, int] = defaultdict(int)
    for ch in channels:
        counts[ch] += 1
    for ch, n in counts.items():
        limiter.acquire(
            [
                Limit(f"account:{account_id}", rate),
                Limit(f"channel:{ch}", settings.channel_rates.get(ch, 0.0)),
            ],
            n,
        )


def _hand_over(
    providers: Mapping[str, Provider], messages: list[OutboundMessage], deadline: float
) -> list[SendResult | None]:
    """Hand messages to their providers; None for those not handed over before ``deadline``.

    A claim must never outlive half the lease: past it, reclaim_stale could
    re-queue a row this worker is still about to send.
    """
    results: list[SendResult | None] = [None] * len(messages)
    by_channel: dict[str, list[int]] = defaultdict(list)
    for i, m in enumerate(messages):
        by_channel[m.channel].append(i)
    for channel, idx in by_channel.items():
        provider = providers.get(channel)
        if provider is None:
            for i in idx:
                results[i] = SendResult(
                    Outcome.CHANNEL,
                    error_code="no_provider",
                    error_text=f"no provider for channel {channel}",
                )
            continue
        step = max(1, provider.handoff_group)
        for start in range(0, len(idx), step):
            if time.monotonic() > deadline:
                break
            part = idx[start : start + step]
            for i, result in zip(
                part, metrics.hand_over(provider, [messages[i] for i in part]), strict=True
            ):
                results[i] = result
    return results


def retry_delay(*, settings: Settings, attempt: int, retry_after: float | None) -> float:
    """Seconds before the next try on the same channel (the schedule's last step repeats)."""
    schedule = settings.send_retry_schedule or (60.0,)
    delay = schedule[min(attempt, len(schedule)) - 1]
    return max(delay, retry_after or 0.0)


def record_results(
    *,
    session: Session,
    settings: Settings,
    batch: Batch,
    channels: Sequence[str],
    claimed: Sequence[Any],
    results: Sequence[SendResult | None],
    now: datetime,
) -> int:
    """Record each hand-off's outcome: sent, retry later, fall back, or fail.

    A None result was never handed over (lease deadline): it is queued again as it was.
    Returns how many are queued to be tried again at once (fallbacks, deferred).
    """
    attempts: list[dict[str, Any]] = []
    sent: list[dict[str, Any]] = []
    requeue: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    expired: list[dict[str, Any]] = []
    sent_changes, failed_changes, expired_changes = [], [], []
    requeue_changes: list[events.Change] = []
    for row, result in zip(claimed, results, strict=True):
        if result is None:
            requeue_changes.append(events.Change(row.id, row.to, row.channel, row.client_id))
            requeue.append(
                {
                    "rid": row.id,
                    "error_code": None,
                    "error_text": None,
                    "now": now,
                    "index": row.channel_index,
                    "channel": row.channel,
                    "attempts": row.attempts - 1,
                    "next_at": None,
                    "enq": now,
                }
            )
            continue
        error = result.error_text
        attempts.append(
            {
                "recipient_id": row.id,
                "channel": row.channel,
                "outcome": result.outcome.value,
                "error": error,
                "provider_message_id": result.provider_message_id,
                "at": now,
            }
        )
        base = {"rid": row.id, "error_code": result.error_code, "error_text": error, "now": now}
        change = events.Change(row.id, row.to, row.channel, row.client_id, result.error_code, error)
        if result.outcome is Outcome.ACCEPTED:
            sent.append({"rid": row.id, "pid": result.provider_message_id, "now": now})
            sent_changes.append(events.Change(row.id, row.to, row.channel, row.client_id))
        elif result.outcome is Outcome.TRANSIENT:
            at = now + timedelta(
                seconds=retry_delay(
                    settings=settings, attempt=row.attempts, retry_after=result.retry_after
                )
            )
            if at >= batch.expire_at:
                expired.append(base)
                expired_changes.append(change)
            else:
                requeue_changes.append(change)
                requeue.append(
                    {
                        **base,
                        "index": row.channel_index,
                        "channel": row.channel,
                        "attempts": row.attempts,
                        "next_at": at,
                        "enq": None,
                    }
                )
        elif result.outcome is Outcome.CHANNEL and row.channel_index + 1 < len(channels):
            nxt = row.channel_index + 1
            # Immediate fallback: the running chunk picks it up again, so it stays enqueued.
            requeue_changes.append(change)
            requeue.append(
                {
                    **base,
                    "index": nxt,
                    "channel": channels[nxt],
                    "attempts": 0,
                    "next_at": None,
                    "enq": now,
                }
            )
        else:
            failed.append(base)
            failed_changes.append(change)
    conn = session.connection()
    # Taking the batch row first orders this transaction with a cancel (which changes
    # that row first too): a cancel committed before us is seen here, and one after
    # us finds whatever we queue again.
    batch_status = session.execute(
        update(Batch).where(Batch.id == batch.id).values(progress_at=now).returning(Batch.status)
    ).scalar_one()
    if attempts:
        conn.execute(insert(Attempt), attempts)
    in_sending = recipients.c.status == R.SENDING.value
    by_id = recipients.c.id == bindparam("rid")
    if sent:
        conn.execute(
            recipients.update()
            .where(by_id, in_sending)
            .values(
                status=R.SENT.value,
                provider_message_id=bindparam("pid"),
                sent_at=bindparam("now"),
                updated_at=bindparam("now"),
                claimed_at=None,
                error_code=None,
                error_text=None,
            ),
            sent,
        )
    if requeue:
        conn.execute(
            recipients.update()
            .where(by_id, in_sending)
            .values(
                status=R.QUEUED.value,
                channel_index=bindparam("index"),
                channel=bindparam("channel"),
                attempts=bindparam("attempts"),
                next_attempt_at=bindparam("next_at"),
                enqueued_at=bindparam("enq"),
                claimed_at=None,
                error_code=bindparam("error_code"),
                error_text=bindparam("error_text"),
                updated_at=bindparam("now"),
            ),
            requeue,
        )
    if requeue and batch_status in (BatchStatus.CANCELLED, BatchStatus.EXPIRED):
        # The batch stopped while these were out: queued again just now, they are
        # cancelled (or expired) in the same transaction instead of tried again.
        stop = R.CANCELLED if batch_status == BatchStatus.CANCELLED else R.EXPIRED
        conn.execute(
            recipients.update()
            .where(recipients.c.id == bindparam("rid"), recipients.c.status == R.QUEUED.value)
            .values(status=stop.value, updated_at=bindparam("now")),
            [{"rid": row["rid"], "now": now} for row in requeue],
        )
        events.record(session=session, batch=batch, status=stop, changes=requeue_changes, at=now)
        requeue = []
    for rows, status in ((failed, R.FAILED), (expired, R.EXPIRED)):
        if rows:
            conn.execute(
                recipients.update()
                .where(by_id, in_sending)
                .values(
                    status=status.value,
                    claimed_at=None,
                    error_code=bindparam("error_code"),
                    error_text=bindparam("error_text"),
                    updated_at=bindparam("now"),
                ),
                rows,
            )
    events.record(session=session, batch=batch, status=R.SENT, changes=sent_changes, at=now)
    events.record(session=session, batch=batch, status=R.FAILED, changes=failed_changes, at=now)
    events.record(session=session, batch=batch, status=R.EXPIRED, changes=expired_changes, at=now)
    return sum(1 for row in requeue if row["next_at"] is None)


def reclaim_stale(
    *,
    session: Session,
    settings: Settings,
    providers: Mapping[str, Provider],
    now: datetime,
    limit: int = 500,
) -> dict[str, int]:
    """Settle recipients left in ``sending`` past the lease by a worker that died.

    The provider's ledger decides: accepted -> sent; never received -> queued again
    (safe to send); unknown -> failed, because sending again could send twice.
    A live worker stops handing off at half the lease, so a row past the whole
    lease is not about to be sent; each write is conditional on the claim seen,
    so an outcome recorded meanwhile is never overwritten.
    """
    cutoff = now - timedelta(seconds=settings.send_lease)
    stale = session.execute(
        select(Recipient, Batch)
        .join(Batch, Batch.id == Recipient.batch_id)
        .where(Recipient.status == R.SENDING, Recipient.claimed_at < cutoff)
        .limit(limit)
        .with_for_update(skip_locked=True, of=Recipient)
    ).all()
    counts: dict[str, int] = defaultdict(int)
    for rec, batch in stale:
        provider = providers.get(rec.channel)
        message = OutboundMessage(
            recipient_id=rec.id,
            channel=rec.channel,
            to=rec.to,
            sender=batch.sender,
            body=rec.body or batch.body,
            attempt=rec.attempts,
        )
        found, ref = provider.lookup(message) if provider else (Lookup.UNKNOWN, None)
        values: dict[str, Any] = {"claimed_at": None, "updated_at": now}
        status: R | None
        if found is Lookup.ACCEPTED:
            status = R.SENT
            values.update(status=R.SENT, provider_message_id=ref, sent_at=now)
        elif found is Lookup.NOT_FOUND:
            status = None
            values.update(status=R.QUEUED, enqueued_at=None, next_attempt_at=None)
        else:
            status = R.FAILED
            values.update(
                status=R.FAILED,
                error_code="outcome_unknown",
                error_text="worker lost during hand-off; not re-sent to avoid a duplicate",
            )
        settled = session.execute(
            update(Recipient)
            .where(
                Recipient.id == rec.id,
                Recipient.status == R.SENDING,
                Recipient.claimed_at == rec.claimed_at,
            )
            .values(**values)
            .returning(*events.CHANGE_COLUMNS)
        ).all()
        if not settled:
            continue  # its worker recorded an outcome after all
        counts[found.value] += 1
        session.add(
            Attempt(
                recipient_id=rec.id,
                channel=rec.channel,
                outcome=f"reclaim:{found.value}",
                provider_message_id=ref,
                at=now,
            )
        )
        if status is not None:
            events.record(
                session=session,
                batch=batch,
                status=status,
                changes=[events.Change.from_row(row) for row in settled],
                at=now,
            )
            complete_if_done(session=session, batch_id=batch.id, now=now)
    session.flush()
    return dict(counts)
