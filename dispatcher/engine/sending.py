"""Sending: token, claim, hand-off, record; for one chunk or a list of recipients.

This is the one service that owns several transactions, on purpose: a claim
(``queued`` -> ``sending``) is committed BEFORE the provider is called, and the
outcome is recorded in a second transaction after it. A worker that dies in
between leaves rows in ``sending`` that :func:`reclaim_stale` settles by asking
the provider, so nothing is lost and nothing is handed over twice. What an
outcome becomes is decided and written in ``engine/recording.py``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import metrics
from dispatcher.accounts.models import Account
from dispatcher.batches.models import Attempt, Batch, Recipient
from dispatcher.batches.transitions import claim_recipients, transition_recipients
from dispatcher.channels.base import Lookup, OutboundMessage, Outcome, Provider, SendResult
from dispatcher.config import Settings
from dispatcher.db import read_transaction, transaction, utcnow
from dispatcher.engine import recording
from dispatcher.engine.scheduling import complete_if_done, expire_recipients
from dispatcher.ratelimit import Limit, RateLimiter
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
            claimed = claim_recipients(
                session=session,
                where=[target],
                # Stamped now, after any wait for tokens: the lease starts here.
                values={"claimed_at": clock(), "attempts": Recipient.attempts + 1},
                at=now,
                returning=CLAIM_COLUMNS,
            )
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
                account_id=batch.account_id,
                expire_at=batch.expire_at,
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
                providers=providers,
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


def record_results(
    *,
    session: Session,
    settings: Settings,
    batch: Batch,
    channels: Sequence[str],
    providers: Mapping[str, Provider],
    claimed: Sequence[Any],
    results: Sequence[SendResult | None],
    now: datetime,
) -> int:
    """Record each hand-off's outcome: sent, retry later, fall back, or fail.

    A None result was never handed over (lease deadline): it is queued again as it was.
    Returns how many are queued to be tried again at once (fallbacks, deferred).
    """
    decisions = [
        recording.decide(
            row,
            result,
            channels=channels,
            expire_at=batch.expire_at,
            settings=settings,
            now=now,
            provider=_provider_name(providers, row.channel),
        )
        for row, result in zip(claimed, results, strict=True)
    ]
    return recording.apply(session=session, batch=batch, decisions=decisions, now=now)


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
        message = OutboundMessage(
            recipient_id=rec.id,
            channel=rec.channel,
            to=rec.to,
            sender=batch.sender,
            body=rec.body or batch.body,
            attempt=rec.attempts,
            account_id=batch.account_id,
            expire_at=batch.expire_at,
        )
        found, ref = provider.lookup(message) if provider else (Lookup.UNKNOWN, None)
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
            where=[Recipient.id == rec.id, Recipient.claimed_at == rec.claimed_at],
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
        if to is not R.QUEUED:
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
