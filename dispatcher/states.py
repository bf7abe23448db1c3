"""The state machines of batches, recipients and callbacks: the only place a status may change.

Recipient and batch statuses are written only by ``dispatcher/batches/transitions.py``
(conditional ``UPDATE ... WHERE status IN`` :func:`recipient_sources` /
:func:`batch_sources`, narrowed with :func:`guard`) or, for a loaded row, after
:func:`check_batch` / :func:`check_recipient`; so an illegal transition cannot be
written from anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import TypeVar


class BatchStatus(StrEnum):
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    SENDING = "sending"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class RecipientStatus(StrEnum):
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    # Accepted by the carrier, but no receipt came by the deadline (or a lost worker's
    # hand-off cannot be looked up): final, and says so rather than guessing.
    UNKNOWN = "unknown"
    # Opened by the user (RCS, WhatsApp): reported after delivered, or instead of it.
    READ = "read"


B, R = BatchStatus, RecipientStatus

BATCH_TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    B.SCHEDULED: frozenset({B.QUEUED, B.SENDING, B.CANCELLED, B.EXPIRED}),
    # queued -> scheduled: send_at moved beyond the horizon after promotion.
    B.QUEUED: frozenset({B.SCHEDULED, B.SENDING, B.CANCELLED, B.EXPIRED}),
    B.SENDING: frozenset({B.COMPLETED, B.CANCELLED, B.EXPIRED}),
    # completed -> sending: a late channel failure queued a sent recipient on its next
    # channel (the one way out, taken only by dispatcher/engine/fallback.py).
    B.COMPLETED: frozenset({B.SENDING}),
    B.CANCELLED: frozenset(),
    B.EXPIRED: frozenset(),
}

RECIPIENT_TRANSITIONS: dict[RecipientStatus, frozenset[RecipientStatus]] = {
    R.SCHEDULED: frozenset({R.QUEUED, R.CANCELLED, R.EXPIRED}),
    # queued -> failed: every channel was refused before a send (e.g. no channel left).
    R.QUEUED: frozenset({R.SENDING, R.CANCELLED, R.EXPIRED, R.FAILED}),
    # sending -> queued: a transient failure or a fallback to the next channel.
    # sending -> unknown: a lost worker's hand-off the provider cannot look up.
    R.SENDING: frozenset({R.SENT, R.QUEUED, R.FAILED, R.EXPIRED, R.UNKNOWN}),
    # A receipt may still fail or expire a message the carrier accepted; none by the
    # receipt deadline makes it unknown.
    # sent -> read: a read report that overtook the delivery report (it implies delivery).
    # sent -> queued: the channel's webhook says it could not carry the message after
    # accepting it (late fallback to the next channel; dispatcher/engine/fallback.py).
    R.SENT: frozenset({R.DELIVERED, R.FAILED, R.EXPIRED, R.UNKNOWN, R.READ, R.QUEUED}),
    # Final for the batch, yet a channel that reports reading moves it on once more.
    R.DELIVERED: frozenset({R.READ}),
    R.FAILED: frozenset(),
    R.EXPIRED: frozenset(),
    R.CANCELLED: frozenset(),
    R.REJECTED: frozenset(),
    R.UNKNOWN: frozenset(),
    R.READ: frozenset(),
}

FINAL_RECIPIENT = frozenset(s for s, nxt in RECIPIENT_TRANSITIONS.items() if not nxt - {R.READ})
# Not yet claimed by a worker: what a cancel may still stop.
CANCELLABLE_RECIPIENT = frozenset({R.SCHEDULED, R.QUEUED})
OPEN_BATCH = frozenset({B.SCHEDULED, B.QUEUED, B.SENDING})


class CallbackState(StrEnum):
    """A webhook's delivery state (the callbacks table)."""

    PENDING = "pending"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    DEAD = "dead"
    HELD = "held"


C = CallbackState

CALLBACK_TRANSITIONS: dict[CallbackState, frozenset[CallbackState]] = {
    # pending -> held: its endpoint is disabled.
    C.PENDING: frozenset({C.DELIVERING, C.HELD}),
    # delivering -> pending: a failed attempt with retries left, or a reclaimed lease.
    C.DELIVERING: frozenset({C.DELIVERED, C.PENDING, C.DEAD}),
    C.DELIVERED: frozenset(),
    # dead/held -> pending: replayed by the client or released by enable_endpoint.
    C.DEAD: frozenset({C.PENDING}),
    C.HELD: frozenset({C.PENDING}),
}


class IllegalTransition(RuntimeError):
    """A status change that the state machine does not allow."""


def check_batch(current: BatchStatus, new: BatchStatus) -> BatchStatus:
    """Return ``new`` if a batch may move there from ``current``, else raise."""
    if new not in BATCH_TRANSITIONS[current]:
        raise IllegalTransition(f"batch {current} -> {new}")
    return new


def check_recipient(current: RecipientStatus, new: RecipientStatus) -> RecipientStatus:
    """Return ``new`` if a recipient may move there from ``current``, else raise."""
    if new not in RECIPIENT_TRANSITIONS[current]:
        raise IllegalTransition(f"recipient {current} -> {new}")
    return new


def recipient_sources(new: RecipientStatus) -> tuple[RecipientStatus, ...]:
    """The statuses a recipient may move to ``new`` from (for bulk conditional updates)."""
    return tuple(s for s, nxt in RECIPIENT_TRANSITIONS.items() if new in nxt)


def batch_sources(new: BatchStatus) -> tuple[BatchStatus, ...]:
    """The statuses a batch may move to ``new`` from (for conditional updates)."""
    return tuple(s for s, nxt in BATCH_TRANSITIONS.items() if new in nxt)


def guard(
    new: RecipientStatus, current: Iterable[RecipientStatus] | None = None
) -> tuple[RecipientStatus, ...]:
    """The statuses a conditional update to ``new`` may match: ``current`` (each checked), or all.

    Raises IllegalTransition if any of ``current`` may not move to ``new``.
    """
    return _guard(recipient_sources, check_recipient, new, current)


def batch_guard(
    new: BatchStatus, current: Iterable[BatchStatus] | None = None
) -> tuple[BatchStatus, ...]:
    """As :func:`guard`, for batches."""
    return _guard(batch_sources, check_batch, new, current)


S = TypeVar("S", BatchStatus, RecipientStatus)


def _guard(
    sources: Callable[[S], tuple[S, ...]],
    check: Callable[[S, S], S],
    new: S,
    current: Iterable[S] | None,
) -> tuple[S, ...]:
    if current is None:
        return sources(new)
    statuses = tuple(current)
    for status in statuses:
        check(status, new)
    return statuses
