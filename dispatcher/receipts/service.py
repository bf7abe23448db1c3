"""Delivery receipts: applied to a sent message, or kept until its outcome is recorded.

A receipt names a message by (provider, provider message id). A fast carrier
answers before the worker has recorded the hand-off (the id is written only
then), and a worker may die in between: such a receipt is stored in
``pending_receipts`` and applied by :func:`settle` in the transaction that
records the outcome (``engine/recording.py``, ``reclaim_stale``). So no receipt
is lost; one that never matches is dropped after ``receipt_retention``, counted.
A ``sent`` message with no receipt by ``receipt_deadline`` becomes ``unknown``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import dataclass_transform

from sqlalchemy import ColumnElement, delete, or_, select
from sqlalchemy.orm import Session

from dispatcher import metrics
from dispatcher.batches.models import Recipient
from dispatcher.batches.transitions import transition_recipients
from dispatcher.channels.base import CHANNEL_FAILED, Receipt
from dispatcher.config import Settings
from dispatcher.db import one_of
from dispatcher.engine import fallback
from dispatcher.receipts.models import PendingReceipt
from dispatcher.states import RECIPIENT_TRANSITIONS, RecipientStatus

__all__ = [
    "RECEIPT_STATUSES",
    "Accepted",
    "Receipt",
    "Swept",
    "accept",
    "settle",
    "sweep",
]

log = logging.getLogger(__name__)
R = RecipientStatus

RECEIPT_STATUSES = {
    "delivered": R.DELIVERED,
    "failed": R.FAILED,
    "expired": R.EXPIRED,
    "read": R.READ,
    # Failed for its channel: the next channel of the recipient's list (failed if none).
    CHANNEL_FAILED: R.FAILED,
}
# Where a receipt may move a message from: only ``sent``, but a read report also
# follows a delivered one (and a late delivery report after it changes nothing).
SOURCES = {R.READ: (R.SENT, R.DELIVERED)}
# Receipts whose move clears the error columns, by status: their group in _apply.
CLEAN = {s: (s, None, None) for s, to in RECEIPT_STATUSES.items() if to in (R.DELIVERED, R.READ)}
NO_RECEIPT = ("no_receipt", "no delivery receipt came within the receipt deadline")


@dataclass_transform(frozen_default=True)
class _Tally:
    """Frozen counts, one field per outcome; ``as_dict`` is their JSON-safe form."""

    def __init_subclass__(cls) -> None:
        dataclass(frozen=True)(cls)

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class Accepted(_Tally):
    """Receipts applied now, kept for later, or ignored (a carrier's reply: counts only,
    since receipts cross tenants)."""

    applied: int = 0
    pending: int = 0
    ignored: int = 0


class Swept(_Tally):
    """One sweep: late matches applied, stored receipts dropped (lost), messages made unknown."""

    applied: int = 0
    dropped: int = 0
    unknown: int = 0


def _of(provider: str) -> ColumnElement[bool]:
    # Rows recorded before recipients.provider existed carry none: any provider matches them.
    return or_(Recipient.provider == provider, Recipient.provider.is_(None))


def _apply(
    *, session: Session, provider: str, receipts: Iterable[Receipt], now: datetime
) -> set[str]:
    """Apply receipts to ``sent`` messages of ``provider``; returns the ids that matched.

    One conditional UPDATE per outcome: only a ``sent`` message takes a receipt
    (a ``delivered`` one takes ``read`` too), so final messages and late or
    repeated receipts change nothing, and two carriers' retries racing on one
    message cannot both apply. At most one receipt per message id.
    """
    # Keyed by the receipt's status text, not the enum: a StrEnum hashes in Python.
    groups: dict[tuple[str, str | None, str | None], list[str]] = defaultdict(list)
    late: list[fallback.Failure] = []
    for receipt in receipts:
        status = receipt.status
        if status in CLEAN:
            groups[CLEAN[status]].append(receipt.provider_message_id)
        elif status == CHANNEL_FAILED:
            late.append(
                fallback.Failure(
                    receipt.provider_message_id,
                    receipt.error_code or CHANNEL_FAILED,
                    receipt.error_text,
                )
            )
        else:
            code = receipt.error_code or RECEIPT_STATUSES[status].value
            groups[(status, code, receipt.error_text)].append(receipt.provider_message_id)
    matched: set[str] = set()
    for (status, error_code, text), refs in groups.items():
        new = RECEIPT_STATUSES[status]
        moved = transition_recipients(
            session=session,
            to=new,
            current=SOURCES.get(new, (R.SENT,)),
            where=[one_of(session, Recipient.provider_message_id, refs), _of(provider)],
            values={"error_code": error_code, "error_text": text},
            at=now,
        )
        matched.update(m.provider_message_id for m in moved if m.provider_message_id)
    if late:
        refs = [f.provider_message_id for f in late]
        matched |= fallback.fall_back(
            session=session,
            where=[one_of(session, Recipient.provider_message_id, refs), _of(provider)],
            failures=late,
            now=now,
        )
    return matched


def _sources(receipt: Receipt) -> tuple[RecipientStatus, ...]:
    """The statuses a message may take ``receipt`` in (as ``_apply`` moves them)."""
    return SOURCES.get(RECEIPT_STATUSES[receipt.status], (R.SENT,))


def _chains(receipts: Iterable[Receipt]) -> dict[str, list[Receipt]]:
    """Per message id, its receipts in order, each a legal move from the one before.

    A carrier's word does not change (``delivered`` then ``failed`` keeps the first,
    a repeat is dropped), but it may go on: ``delivered`` then ``read`` keeps both.
    """
    chains: dict[str, list[Receipt]] = {}
    for r in receipts:
        chain = chains.get(r.provider_message_id)
        if chain is None:
            chains[r.provider_message_id] = [r]
        elif (
            RECEIPT_STATUSES[r.status] in RECIPIENT_TRANSITIONS[RECEIPT_STATUSES[chain[-1].status]]
        ):
            chain.append(r)
    return chains


def _apply_chains(
    *, session: Session, provider: str, chains: dict[str, list[Receipt]], now: datetime
) -> tuple[int, set[str]]:
    """Apply each chain in order (its first receipts together, then its second ones...).

    Returns how many receipts applied and the ids of the messages they moved.
    """
    applied = 0
    matched: set[str] = set()
    for step in range(max((len(c) for c in chains.values()), default=0)):
        moved = _apply(
            session=session,
            provider=provider,
            receipts=[c[step] for c in chains.values() if len(c) > step],
            now=now,
        )
        applied += len(moved)
        matched |= moved
    return applied, matched


def accept(
    *, session: Session, provider: str, receipts: Sequence[Receipt], now: datetime
) -> Accepted:
    """Apply each receipt to its sent message, or store it until the message's outcome lands.

    A receipt for a message that is already final (or repeated in ``receipts``)
    is ignored. Nothing is lost once the caller commits: answer the carrier after that.
    """
    chains = _chains(r for r in receipts if r.status in RECEIPT_STATUSES)
    applied, matched = _apply_chains(session=session, provider=provider, chains=chains, now=now)
    rest = [r for ref, chain in chains.items() if ref not in matched for r in chain]
    rest_refs = [r.provider_message_id for r in rest]
    now_in = (
        dict(
            session.execute(
                select(Recipient.provider_message_id, Recipient.status).where(
                    one_of(session, Recipient.provider_message_id, rest_refs), _of(provider)
                )
            ).all()
        )
        if rest
        else {}
    )
    # A message that carries the id but can take no receipt is final already: a late
    # receipt. One that can (sent, on PostgreSQL committed after the UPDATEs above took
    # their snapshot) is kept: the sweep's late match applies it within seconds.
    final = {
        ref
        for ref, chain in chains.items()
        if ref in now_in and now_in[ref] not in _sources(chain[0])
    }
    # A rich message that a late failure moved on from: its later word changes nothing.
    final |= fallback.moved_on(
        session=session,
        refs=[ref for ref in rest_refs if ref not in final],
    )
    keep = [r for r in rest if r.provider_message_id not in final]
    if keep:
        session.add_all(
            PendingReceipt(
                provider=provider,
                provider_message_id=r.provider_message_id,
                status=r.status,
                error_code=r.error_code,
                error_text=r.error_text,
                done_at=r.done_at,
                received_at=now,
            )
            for r in keep
        )
        session.flush()
    ignored = len(receipts) - applied - len(keep)
    metrics.receipts("applied", applied)
    metrics.receipts("waiting", len(keep))
    metrics.receipts("unmatched", ignored)
    return Accepted(applied=applied, pending=len(keep), ignored=ignored)


def settle(*, session: Session, provider: str, refs: Iterable[str], now: datetime) -> int:
    """Apply the stored receipts of messages just recorded as sent; returns how many applied.

    Called in the transaction that wrote ``sent`` with these ids, so the receipt
    lands with the outcome, and in the order they came (``delivered``, then
    ``read``). Stored receipts for these ids are then spent (any not applied
    could only have been ignored).
    """
    refs = list(refs)
    if not refs:
        return 0
    stored = session.scalars(
        select(PendingReceipt)
        .where(
            PendingReceipt.provider == provider,
            one_of(session, PendingReceipt.provider_message_id, refs),
        )
        .order_by(PendingReceipt.id)
    ).all()
    if not stored:
        return 0
    return _settle_rows(session=session, provider=provider, stored=stored, now=now)


def _settle_rows(
    *, session: Session, provider: str, stored: Sequence[PendingReceipt], now: datetime
) -> int:
    chains = _chains(
        Receipt(p.provider_message_id, p.status, p.error_code, p.error_text, p.done_at)
        for p in stored
    )
    applied, matched = _apply_chains(session=session, provider=provider, chains=chains, now=now)
    metrics.receipts("applied", applied)
    if matched:
        session.execute(
            delete(PendingReceipt).where(
                PendingReceipt.id.in_([p.id for p in stored if p.provider_message_id in matched])
            )
        )
    return applied


def _late_matches(*, session: Session, now: datetime, limit: int) -> tuple[int, int]:
    """Apply up to ``limit`` stored receipts whose message is now ``sent`` (or ``delivered``,
    for a ``read``); returns how many were found and how many applied."""
    late = session.execute(
        select(PendingReceipt)
        .join(
            Recipient,
            (Recipient.provider_message_id == PendingReceipt.provider_message_id)
            & or_(Recipient.provider == PendingReceipt.provider, Recipient.provider.is_(None)),
        )
        .where(
            # Spelled out so the planners may use the partial index on message ids.
            Recipient.provider_message_id.is_not(None),
            or_(
                Recipient.status == R.SENT,
                # A read may still follow a delivery that was applied meanwhile.
                (Recipient.status == R.DELIVERED) & (PendingReceipt.status == "read"),
            ),
        )
        .order_by(PendingReceipt.id)
        .limit(limit)
    ).scalars()
    by_provider: dict[str, list[PendingReceipt]] = defaultdict(list)
    found = 0
    for p in late:
        by_provider[p.provider].append(p)
        found += 1
    applied = sum(
        _settle_rows(session=session, provider=provider, stored=rows, now=now)
        for provider, rows in by_provider.items()
    )
    return found, applied


# At most this many groups of late matches in one sweep (its transaction stays bounded).
LATE_GROUPS = 20


def sweep(*, session: Session, settings: Settings, now: datetime, limit: int = 1000) -> Swept:
    """The periodic safety net: late matches, expired stored receipts, overdue sent messages.

    A receipt stored while its outcome was being committed concurrently (on
    PostgreSQL both transactions can miss each other) is applied here; one that
    matched nothing for ``receipt_retention`` is dropped and counted; a ``sent``
    message with no receipt by ``receipt_deadline`` becomes ``unknown``.
    """
    applied = 0
    # Group after group: a burst of races (a loaded PostgreSQL) is applied by this run,
    # not a group per run; a group that applied nothing would only be found again.
    for _ in range(LATE_GROUPS):
        found, done = _late_matches(session=session, now=now, limit=limit)
        applied += done
        if found < limit or not done:
            break
    cutoff = now - timedelta(seconds=settings.receipt_retention)
    expired = session.scalars(
        select(PendingReceipt.id).where(PendingReceipt.received_at < cutoff).limit(limit)
    ).all()
    if expired:
        session.execute(delete(PendingReceipt).where(PendingReceipt.id.in_(expired)))
        metrics.receipts("dropped", len(expired))
        log.warning(
            "dropped %d delivery receipts that matched no message for %ss",
            len(expired),
            settings.receipt_retention,
        )
    sent_before = Recipient.sent_at < now - timedelta(seconds=settings.receipt_deadline)
    overdue = session.scalars(
        select(Recipient.id)
        .where(
            Recipient.status == R.SENT,
            sent_before,
        )
        .limit(limit)
    ).all()
    unknown = (
        transition_recipients(
            session=session,
            to=R.UNKNOWN,
            current=(R.SENT,),
            ids=overdue,
            # Again in the UPDATE: one that a late fallback moved on and its next channel
            # sent meanwhile (PostgreSQL lets that commit between the two) is not overdue.
            where=[sent_before],
            values={"error_code": NO_RECEIPT[0], "error_text": NO_RECEIPT[1]},
            at=now,
        )
        if overdue
        else []
    )
    session.flush()
    return Swept(applied=applied, dropped=len(expired), unknown=len(unknown))
