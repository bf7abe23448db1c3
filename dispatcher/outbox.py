"""Publish-after-commit: tasks are queued only once the rows they name are committed.

Services call :func:`defer` to say "publish this when the transaction commits";
:func:`install` hooks a session factory so that, after each commit, the deferred
messages go to a :class:`Publisher` (Celery in production, a recorder in tests).
If a publish fails after the commit, nothing is lost: every deferred message also
has a durable trace (``enqueued_at`` columns) that the scheduler's sweep re-publishes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)
KEY = "dispatcher.outbox"


class TaskName(StrEnum):
    """Every task the workers run: the one list the outbox, the tasks and the routes share."""

    DISPATCH_BATCH = "dispatch_batch"
    SEND_CHUNK = "send_chunk"
    SEND_RECIPIENTS = "send_recipients"
    DELIVER_CALLBACKS = "deliver_callbacks"
    PROMOTE_DUE = "promote_due"
    RECLAIM_STALE = "reclaim_stale"
    EXPIRE_DUE = "expire_due"
    SIMULATOR_RECEIPTS = "simulator_receipts"
    SWEEP_RECEIPTS = "sweep_receipts"
    PURGE_RETENTION = "purge_retention"
    PROMOTE_CALLBACKS = "promote_callbacks"


class QueueName(StrEnum):
    """The broker queues; each worker pool consumes some of them."""

    DISPATCH = "dispatch"
    SEND = "send"
    CALLBACKS = "callbacks"


# Routing: which queue each task goes to (tests check that every task has one).
QUEUES: Mapping[TaskName, QueueName] = {
    TaskName.DISPATCH_BATCH: QueueName.DISPATCH,
    TaskName.SEND_CHUNK: QueueName.SEND,
    TaskName.SEND_RECIPIENTS: QueueName.SEND,
    TaskName.DELIVER_CALLBACKS: QueueName.CALLBACKS,
    TaskName.PROMOTE_DUE: QueueName.DISPATCH,
    TaskName.RECLAIM_STALE: QueueName.DISPATCH,
    TaskName.EXPIRE_DUE: QueueName.DISPATCH,
    TaskName.SIMULATOR_RECEIPTS: QueueName.DISPATCH,
    TaskName.SWEEP_RECEIPTS: QueueName.DISPATCH,
    TaskName.PURGE_RETENTION: QueueName.DISPATCH,
    TaskName.PROMOTE_CALLBACKS: QueueName.CALLBACKS,
}


def queue_for(task: str) -> QueueName:
    """The queue of ``task``; an unknown name raises ValueError instead of picking a default."""
    return QUEUES[TaskName(task)]


@dataclass(frozen=True)
class Message:
    """A task to publish: its name, JSON-safe kwargs, an optional ETA and expiry.

    ``expires``: seconds after publishing when a worker drops it unrun (for tasks that
    only hurry work a periodic task also does).
    """

    task: TaskName
    kwargs: dict[str, Any] = field(default_factory=dict)
    eta: datetime | None = None
    expires: float | None = None

    def __post_init__(self) -> None:
        # A misspelt name fails where the message is made, not in a worker later.
        object.__setattr__(self, "task", TaskName(self.task))


@dataclass(frozen=True)
class Revoke:
    """Ask workers to drop these tasks: an optimisation only, never relied on."""

    task_ids: tuple[str, ...]


def dispatch_task_id(batch_id: str) -> str:
    """The broker task id of a batch's dispatch, stable so that cancel can name it."""
    return f"dispatch_batch:{batch_id}"


def chunk_task_id(batch_id: str, start: int) -> str:
    """The broker task id of the chunk starting at ``start``."""
    return f"send_chunk:{batch_id}:{start}"


def task_id_for(message: Message) -> str | None:
    """The stable task id of a dispatch or chunk message (others get a random one)."""
    if message.task is TaskName.DISPATCH_BATCH:
        return dispatch_task_id(message.kwargs["batch_id"])
    if message.task is TaskName.SEND_CHUNK:
        return chunk_task_id(message.kwargs["batch_id"], message.kwargs["start"])
    return None


def chunk_ranges(*, count: int, size: int) -> list[tuple[int, int]]:
    """Half-open seq ranges covering ``count`` recipients in batch order."""
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def batch_task_ids(*, batch_id: str, count: int, chunk_size: int | None) -> tuple[str, ...]:
    """The ids of a batch's dispatch task and (given the chunk size) its chunk tasks."""
    ranges = chunk_ranges(count=count, size=chunk_size) if chunk_size else []
    return (dispatch_task_id(batch_id), *(chunk_task_id(batch_id, start) for start, _ in ranges))


class Publisher(Protocol):
    def publish(self, messages: list[Message | Revoke]) -> None:
        """Send messages to the broker, in order."""


def defer(session: Session, message: Message | Revoke) -> None:
    """Queue ``message`` for publication after this session's transaction commits."""
    session.info.setdefault(KEY, []).append(message)


def install(factory: sessionmaker[Session], publisher: Publisher) -> None:
    """Publish deferred messages after every commit of sessions made by ``factory``."""

    @event.listens_for(factory, "after_commit")
    def _after_commit(session: Session) -> None:
        messages = session.info.pop(KEY, [])
        if not messages:
            return
        try:
            publisher.publish(messages)
        except Exception:
            # The rows are committed with enqueued_at set; the sweep re-publishes them.
            log.exception(
                "publishing %d message(s) failed; the scheduler sweep will retry", len(messages)
            )

    @event.listens_for(factory, "after_soft_rollback")
    def _after_rollback(session: Session, _previous: Any) -> None:
        session.info.pop(KEY, None)
