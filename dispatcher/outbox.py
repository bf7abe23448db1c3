"""Publish-after-commit: tasks are queued only once the rows they name are committed.

Services call :func:`defer` to say "publish this when the transaction commits";
:func:`install` hooks a session factory so that, after each commit, the deferred
messages go to a :class:`Publisher` (Celery in production, a recorder in tests).
If a publish fails after the commit, nothing is lost: every deferred message also
has a durable trace (``enqueued_at`` columns) that the scheduler's sweep re-publishes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)
KEY = "dispatcher.outbox"


@dataclass(frozen=True)
class Message:
    """A task to publish: its name, JSON-safe kwargs, an optional ETA."""

    task: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    eta: datetime | None = None


class Publisher(Protocol):
    def publish(self, messages: list[Message]) -> None:
        """Send messages to the broker, in order."""


def defer(session: Session, message: Message) -> None:
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
