"""Sending: token, claim, hand-off, record; for one chunk or a list of recipients.

This is the one service that owns several transactions, on purpose: a claim
(``queued`` -> ``sending``) is committed BEFORE the provider is called, and the
outcome is recorded in a second transaction after it. A worker that dies in
between leaves rows in ``sending`` that :func:`reclaim_stale` settles by asking
the provider, so nothing is lost and nothing is handed over twice. What an
outcome becomes is decided and written in ``engine/recording.py``.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from operator import attrgetter
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import metrics, outbox
from dispatcher.accounts.models import Account
from dispatcher.batches.models import Attempt, Batch, Recipient
from dispatcher.batches.transitions import claim_recipients, transition_recipients
from dispatcher.channels.base import (
    Lookup,
    OutboundMessage,
    Outcome,
    Provider,
    SendResult,
    SmsOptions,
)
from dispatcher.config import Settings
from dispatcher.db import deadlock_retries, read_transaction, transaction, utcnow
from dispatcher.engine import recording
from dispatcher.engine.backpressure import CallbackBackpressure
from dispatcher.engine.fallback import stop_requeued
from dispatcher.engine.scheduling import complete_if_done, expire_batch
from dispatcher.outbox import TaskName
from dispatcher.ratelimit import Grant, Limit, RateLimiter
from dispatcher.receipts import service as receipts
from dispatcher.states import BatchStatus, RecipientStatus

R = RecipientStatus

CLAIM_COLUMNS = (
    Recipient.id,
    Recipient.to,
    Recipient.body,
    Recipient.channel,
    Recipient.channel_index,
    Recipient.attempts,
    Recipient.client_id,
    Recipient.seq,
)


@dataclass
class SendReport:
    """What one call did, for logs and task results."""

    claimed: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # Recipients handed back for later (rate-limited), and in how many seconds.
    deferred: int = 0
    deferred_for: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe form (Celery task results)."""
        return {
            "claimed": self.claimed,
            "outcomes": dict(self.outcomes),
            "deferred": self.deferred,
            "deferred_for": self.deferred_for,
        }


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
    backpressure: CallbackBackpressure | None = None,
    clock: Callable[[], datetime] = utcnow,
    monotonic: Callable[[], float] = time.monotonic,
) -> SendReport:
    """Send every due, queued recipient of the batch in ``seq_range`` or ``recipient_ids``.

    Per group: tokens, then one claim transaction, the hand-off outside any
    transaction, then one record transaction. Without a rate limit the group is
    chosen inside the claim itself, so a chunk costs two write transactions a group.

    A rate-limited call never holds its process for long: work whose turn is
    further off than ``rate_max_wait`` is deferred (see :func:`_defer`), and after
    ``send_time_slice`` of waiting for tokens the rest goes back to the queue, so
    accounts with a backlog take turns in the send pool. Unthrottled work waits
    while callbacks are behind, for at most the same slice, then goes to the tail
    of the queue (``backpressure``, see engine/backpressure.py).
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
    pace = min(r for r in (rate, *channel_rates) if r) if limited else None
    limit = group_size(settings=settings, rate=pace)
    work = _Work(batch=batch, account_id=account.id, seq_range=seq_range, ids=recipient_ids)
    started = monotonic()
    slice_ends = started + settings.send_time_slice
    # Past half the soft time limit no hand-off starts and the rest goes back to the queue:
    # the limit, raised inside a hand-off, would lose the outcomes of the group in hand
    # (reclaimed after the lease as unknown, sent or not).
    budget_ends = started + settings.task_soft_time_limit / 2
    waited = passing_on = False
    booked: tuple[list[str], str, Grant, float] | None = None
    if pace is not None:
        # Far from the head of its account's line: wait in the database, not in a process.
        turn = _turn_in(factory=factory, settings=settings, work=work, pace=pace, now=clock())
        if turn > settings.rate_max_wait + settings.send_time_slice and _defer(
            factory=factory,
            settings=settings,
            work=work,
            delay=turn - settings.rate_max_wait,
            now=clock(),
            report=report,
        ):
            return report
    while True:
        now = clock()
        if now >= batch.expire_at:
            # The whole batch, as the scheduler's sweep would: it ends expired.
            with transaction(factory) as session:
                expire_batch(session=session, batch=batch, now=now)
            return report
        if (
            not limited
            and backpressure is not None
            and backpressure.applies_to(batch.recipient_count)
            and backpressure.wait(max(0.0, slice_ends - monotonic()))
        ):
            # Callbacks still behind after a time slice: the work goes to the tail of the
            # queue, as a throttled task's rest does (its rows as they are), and the
            # process moves on.
            with transaction(factory) as session:
                outbox.defer(session, work.again(list(work.ids or ()), eta=None))
            report.deferred_for = 0.0
            return report
        next_group = select(Recipient.id).where(*work.due(now)).order_by(Recipient.seq).limit(limit)
        if limiter is not None and limited:
            # Tokens come before the claim, so the group is read (without the write lock) first.
            # The next group is booked while this one is handed over (see below).
            ahead, booked = booked, None
            if ahead is None:
                ahead = _book_group(factory, limiter, settings, work, rate, next_group)
            if ahead is None:
                break
            group, channel, grant, usable_at = ahead
            if not grant.booked:
                # Booked nothing: come back when the slot is within reach.
                if _defer(
                    factory=factory,
                    settings=settings,
                    work=work,
                    delay=grant.wait - settings.rate_max_wait,
                    now=clock(),
                    report=report,
                ):
                    return report
                continue
            limiter.sleep(usable_at - time.monotonic())
            waited = waited or grant.wait > 0
            # Time slice used up while waiting for tokens: this group is the last one. The
            # rest goes to the tail of the queue when the claim commits, so the next task
            # books the next slot while this one still hands over (no gap in the rate).
            passing_on = waited and monotonic() >= slice_ends
            if not passing_on:
                # The next slot is booked as soon as this one is due, before this group's
                # claim, hand-off and record: however slow those are, no slot goes unused.
                later = select(Recipient.id).where(*work.due(clock()), Recipient.id.not_in(group))
                later = later.order_by(Recipient.seq).limit(limit)
                booked = _book_group(factory, limiter, settings, work, rate, later)
            # On the channel its tokens are for: a row another task moved on to its next
            # channel meanwhile waits for a group booked there.
            target = and_(Recipient.id.in_(group), Recipient.channel == channel)
        else:
            # Rows another claim holds are passed over for the next ones (PostgreSQL): waited
            # for, they would be dropped from the group once that claim commits, and a group
            # cut short reads as the last one. (SQLite runs this statement alone.)
            target = Recipient.id.in_(
                next_group.with_for_update(skip_locked=True).scalar_subquery()
            )
        # Stamped now, after any wait for tokens: the lease starts here. It names the claim:
        # the record moves only rows that still hold it.
        claimed_at = clock()
        with transaction(factory) as session:
            if passing_on:
                rest = [rid for rid in work.ids if rid not in group] if work.ids else []
                outbox.defer(session, work.again(rest, eta=None))
            claimed = claim_recipients(
                session=session,
                where=[target],
                values={"claimed_at": claimed_at, "attempts": Recipient.attempts + 1},
                at=now,
                returning=CLAIM_COLUMNS,
            )
        if passing_on:
            report.deferred_for = 0.0
        # RETURNING gives the rows in whatever order the database met them (PostgreSQL: heap
        # or index order), not its subquery's: they go out in the batch's order (FIFO).
        claimed.sort(key=attrgetter("seq"))
        if not claimed:
            if passing_on:
                return report  # the task just published carries on
            if limited:
                continue  # the candidates were taken or cancelled meanwhile: read again
            break
        report.claimed += len(claimed)
        messages = outbound_many(claimed, batch)
        deadline = min(monotonic() + settings.send_lease / 2, budget_ends)
        results = _hand_over(providers, messages, deadline=deadline, monotonic=monotonic)
        for result in results:
            report.outcomes[result.outcome.value if result else "deferred"] += 1
        # The last group, unless something is to be tried again at once: rate-limited, when
        # no next group was found to book (a group is short also where the channel changes,
        # or where another task took some of it); else a short group.
        last = booked is None if limited else len(claimed) < limit
        # The outcomes are only in memory: a deadlock victim (PostgreSQL) runs again.
        for attempt in deadlock_retries("send record"):
            with attempt, transaction(factory) as session:
                handed = zip(claimed, results, strict=True)
                again = record_results(
                    session, settings, providers, batch, handed, clock(), claimed_at=claimed_at
                )
                if passing_on and again:
                    # The rest went to a new task before this group was handed over: what
                    # the group queued again to be tried at once (a fallback) goes in
                    # another, of those rows only (a second task of the whole chunk would
                    # run beside it).
                    kwargs = {"batch_id": batch_id, "recipient_ids": sorted(again)}
                    outbox.defer(session, outbox.Message(TaskName.SEND_RECIPIENTS, kwargs))
                if last and not again:
                    complete_if_done(session=session, batch_id=batch_id, now=clock())
                    return report
                if not passing_on and monotonic() >= budget_ends:
                    outbox.defer(session, work.again(list(work.ids or ()), eta=None))
                    report.deferred_for = 0.0
                    return report
        if passing_on:
            return report
    with transaction(factory) as session:
        complete_if_done(session=session, batch_id=batch_id, now=clock())
    return report


def same_channel(channel: str) -> Callable[[Any], bool]:
    """A predicate for candidate rows (id, channel) on ``channel``."""
    return lambda row: bool(row[1] == channel)


def _book_group(
    factory: sessionmaker[Session],
    limiter: RateLimiter,
    settings: Settings,
    work: _Work,
    rate: float,
    next_group: Select[Any],
) -> tuple[list[str], str, Grant, float] | None:
    """Read the next group and book its tokens: (ids, channel, grant, when usable); None if
    no group."""
    with read_transaction(factory) as session:
        candidates = session.execute(next_group.add_columns(Recipient.channel)).all()
    if not candidates:
        return None
    # One channel per group, so that one booking covers it (all or nothing).
    channel = candidates[0].channel
    group = [rid for rid, _ in itertools.takewhile(same_channel(channel), candidates)]
    grant = _take_tokens(limiter, settings, work.account_id, rate, channel, len(group))
    return group, channel, grant, time.monotonic() + grant.wait


def _take_tokens(
    limiter: RateLimiter, settings: Settings, account_id: str, rate: float, channel: str, n: int
) -> Grant:
    """Book ``n`` tokens on the account's and the channel's limits, or none (see book)."""
    return limiter.book(
        [
            Limit(f"account:{account_id}", rate),
            Limit(f"channel:{channel}", settings.channel_rates.get(channel, 0.0)),
        ],
        n,
    )


@dataclass(frozen=True)
class _Work:
    """What one send call covers: a seq range of a batch, or some of its recipients."""

    batch: Batch
    account_id: str
    seq_range: tuple[int, int] | None
    ids: Sequence[str] | None

    def selected(self) -> list[ColumnElement[bool]]:
        """This call's recipients, whatever their state."""
        where = [Recipient.batch_id == self.batch.id]
        if self.seq_range is not None:
            where += [Recipient.seq >= self.seq_range[0], Recipient.seq < self.seq_range[1]]
        if self.ids is not None:
            where.append(Recipient.id.in_(self.ids))
        return where

    def due(self, now: datetime) -> list[ColumnElement[bool]]:
        """Those of them queued and due at ``now``."""
        return [
            *self.selected(),
            Recipient.status == R.QUEUED,
            or_(Recipient.next_attempt_at.is_(None), Recipient.next_attempt_at <= now),
        ]

    def again(self, ids: list[str], eta: datetime | None) -> outbox.Message:
        """The task that picks this work up again."""
        if self.seq_range is not None:
            # Same kwargs, so the same stable task id: cancel still names it.
            start, end = self.seq_range
            kwargs: dict[str, Any] = {"batch_id": self.batch.id, "start": start, "end": end}
            return outbox.Message(TaskName.SEND_CHUNK, kwargs, eta=eta)
        kwargs = {"batch_id": self.batch.id, "recipient_ids": ids}
        return outbox.Message(TaskName.SEND_RECIPIENTS, kwargs, eta=eta)


def _turn_in(
    *, factory: sessionmaker[Session], settings: Settings, work: _Work, pace: float, now: datetime
) -> float:
    """Seconds until this work's turn: the account's due recipients ahead of it, at ``pace``.

    "Ahead" is FIFO order: earlier batches of the account (by send time), then
    lower seqs of this batch. Counted only up to twice the horizon's worth: past
    the horizon the work waits for the sweep, which asks again.
    """
    cap = 2 * settings.schedule_horizon
    batch = work.batch
    with read_transaction(factory) as session:
        first = session.scalar(select(func.min(Recipient.seq)).where(*work.due(now)))
        if first is None:
            return 0.0
        earlier = or_(
            Batch.send_at < batch.send_at,
            and_(Batch.send_at == batch.send_at, Batch.created_at < batch.created_at),
        )
        ahead = (
            select(Recipient.id)
            .join(Batch, Batch.id == Recipient.batch_id)
            .where(
                Batch.account_id == work.account_id,
                Batch.status == BatchStatus.SENDING,
                # Deferred ones included: they are ahead in line, whatever their time.
                Recipient.status == R.QUEUED,
                or_(
                    and_(Recipient.batch_id == batch.id, Recipient.seq < first),
                    and_(Recipient.batch_id != batch.id, earlier),
                ),
            )
            .limit(int(pace * cap) + 1)
        )
        count = session.scalar(select(func.count()).select_from(ahead.subquery())) or 0
    return min(count / pace, cap)


def _defer(
    *,
    factory: sessionmaker[Session],
    settings: Settings,
    work: _Work,
    delay: float,
    now: datetime,
    report: SendReport,
) -> int:
    """Hand this call's due recipients back for ``delay`` seconds; returns how many.

    The wait is durable: within the horizon the rows keep ``enqueued_at`` and a
    task is published with an ETA after commit (the sweep re-publishes it if that
    publish is lost); further off, ``enqueued_at`` is cleared and the scheduler's
    sweep publishes them once ``next_attempt_at`` comes within the horizon.
    """
    eta = now + timedelta(seconds=delay) if delay > 0 else None
    published = delay <= settings.schedule_horizon
    with transaction(factory) as session:
        # The batch row first, as record_results does, to order this with a cancel.
        session.execute(update(Batch).where(Batch.id == work.batch.id).values(progress_at=now))
        ids = list(
            session.scalars(
                update(Recipient)
                .where(*work.due(now))
                .values(next_attempt_at=eta, enqueued_at=now if published else None)
                .returning(Recipient.id)
            )
        )
        if ids and published:
            outbox.defer(session, work.again(ids, eta))
    report.deferred += len(ids)
    report.deferred_for = delay
    return len(ids)


def _hand_over(
    providers: Mapping[str, Provider],
    messages: list[OutboundMessage],
    deadline: float,
    monotonic: Callable[[], float] = time.monotonic,
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
            if monotonic() > deadline:
                break
            part = idx[start : start + step]
            for i, result in zip(
                part, metrics.hand_over(provider, [messages[i] for i in part]), strict=True
            ):
                results[i] = result
    return results


def outbound(row: Any, batch: Batch) -> OutboundMessage:
    """The message for a recipient (a claimed row or a loaded one) of ``batch``."""
    return outbound_many([row], batch)[0]


def outbound_many(rows: Iterable[Any], batch: Batch) -> list[OutboundMessage]:
    """The messages for recipients of ``batch``: what the batch gives them all is read once."""
    sender, body, options = batch.sender, batch.body, batch.options
    shared = (options.get("whatsapp_template"), batch.account_id, batch.expire_at)
    sms = SmsOptions.of_batch(options)
    return [
        OutboundMessage(
            row.id, row.channel, row.to, sender, row.body or body, row.attempts, *shared, sms
        )
        for row in rows
    ]


def record_results(
    session: Session,
    settings: Settings,
    providers: Mapping[str, Provider],
    batch: Batch,
    handed: Iterable[tuple[Any, SendResult | None]],
    now: datetime,
    *,
    claimed_at: datetime,
) -> set[str]:
    """Record each hand-off's outcome (claimed row, result): sent, retry later, fall back, or fail.

    A None result was never handed over (lease deadline): it is queued again as it was.
    ``claimed_at`` is the claim's stamp: a row that no longer holds it is not written.
    Returns the ids queued to be tried again at once (fallbacks, never handed over).
    """
    names: dict[str, str | None] = {}
    channels, expire_at = batch.channels, batch.expire_at
    decisions = [
        recording.decide(
            row,
            result,
            channels=channels,
            expire_at=expire_at,
            settings=settings,
            now=now,
            provider=names[row.channel]
            if row.channel in names
            else names.setdefault(row.channel, _provider_name(providers, row.channel)),
        )
        for row, result in handed
    ]
    return recording.apply(
        session=session, batch=batch, decisions=decisions, claimed_at=claimed_at, now=now
    )


def _provider_name(providers: Mapping[str, Provider], channel: str) -> str | None:
    provider = providers.get(channel)
    return provider.name if provider is not None else None


def reclaim_stale(
    *,
    session: Session,
    settings: Settings,
    providers: Mapping[str, Provider],
    now: datetime,
    limit: int = 500,
) -> dict[str, int]:
    """Settle recipients left in ``sending`` past the lease by a worker that died.

    The provider's ledger decides: accepted -> sent (and any receipt that came
    meanwhile is applied); never received -> queued again (safe to send);
    unknown -> ``unknown``, because sending again could send twice. A live worker
    stops handing off at half the lease, so a row past the whole lease is not
    about to be sent; each write is conditional on the claim seen, so an outcome
    recorded meanwhile is never overwritten.
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
        found, ref = (
            provider.lookup(outbound(rec, batch), claimed_at=rec.claimed_at)
            if provider
            else (Lookup.UNKNOWN, None)
        )
        # The batch row before any write but this row's, and not waited for: its holder may
        # be this claim's own worker, recording late, which took it first and waits for
        # the row held here (a deadlock, PostgreSQL). Left to the next run, if that record
        # does not settle it first; a cancel in progress, the same.
        status = session.scalar(
            select(Batch.status).where(Batch.id == batch.id).with_for_update(skip_locked=True)
        )
        if status is None:
            continue
        to, values = RECLAIMED[found]
        if found is Lookup.ACCEPTED:
            values = {
                **values,
                "provider_message_id": ref,
                "provider": _provider_name(providers, rec.channel),
                "sent_at": now,
            }
        settled = transition_recipients(
            session=session,
            to=to,
            current=(R.SENDING,),
            where=[Recipient.id == rec.id],
            claimed_at=rec.claimed_at,
            values=values,
            at=now,
            batch=batch,
            record=to is not R.QUEUED,
        )
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
        if found is Lookup.ACCEPTED and ref and provider is not None:
            receipts.settle(session=session, provider=provider.name, refs=[ref], now=now)
        if to is R.QUEUED:
            # A cancel while the claim was out did not count it: queued again in a stopped
            # batch, nothing would ever send or end it. The batch row is held, so a cancel
            # waits, and then finds this row queued.
            stop_requeued(session=session, batch=batch, batch_status=status, ids=[rec.id], now=now)
        else:
            complete_if_done(session=session, batch_id=batch.id, now=now)
    session.flush()
    return dict(counts)


# What reclaim writes for each answer of the provider's ledger.
RECLAIMED: dict[Lookup, tuple[RecipientStatus, dict[str, Any]]] = {
    Lookup.ACCEPTED: (R.SENT, {"claimed_at": None}),
    Lookup.NOT_FOUND: (
        R.QUEUED,
        {"claimed_at": None, "enqueued_at": None, "next_attempt_at": None},
    ),
    Lookup.UNKNOWN: (
        R.UNKNOWN,
        {
            "claimed_at": None,
            "error_code": "outcome_unknown",
            "error_text": "worker lost during hand-off; not re-sent to avoid a duplicate",
        },
    ),
}
