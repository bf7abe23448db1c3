"""Two transactions racing on PostgreSQL: whether one waits for a lock, a second
transaction started in a thread until it has ended or waits for one, and engine events
listened to for a block (where a test steps in between two statements)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from threading import Thread
from typing import Any

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.config import Settings
from tests.helpers import wait_for


def postgres_only(
    settings: Settings,
    why: str = "SQLite: a read transaction cannot write after another one committed",
) -> None:
    if not settings.database_url.startswith("postgresql"):
        pytest.skip(why)


def blocked(sessions: sessionmaker[Session]) -> bool:
    """Whether a transaction on this database waits for a lock (PostgreSQL)."""
    with sessions() as session:
        waiting = session.scalar(
            # This database only: other test processes share the server.
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
        )
    return bool(waiting)


def start_until_blocked(
    sessions: sessionmaker[Session], target: Callable[[], None], *, name: str
) -> Thread:
    """Run ``target`` in a thread; return it once it has ended or waits for a lock."""
    thread = Thread(target=target, name=name)
    thread.start()
    wait_for(lambda: not thread.is_alive() or blocked(sessions))
    return thread


@contextmanager
def listening(engine: Engine, *hooks: tuple[str, Callable[..., Any]]) -> Iterator[None]:
    """``engine``'s events (name, function) listened to for the block, removed after it."""
    for name, fn in hooks:
        event.listen(engine, name, fn)
    try:
        yield
    finally:
        for name, fn in reversed(hooks):
            event.remove(engine, name, fn)
