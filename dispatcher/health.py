"""Is the system able to work: the database, Redis, and a live worker on every queue.

Workers publish a heartbeat, one Redis key per queue and worker hostname that
expires after ``worker_seen_within`` seconds; a queue with no such key has had no
worker for that long.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import redis
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

# The queues a working system needs at least one consumer on.
QUEUES = ("dispatch", "send", "callbacks")
PREFIX = "dispatcher:worker:"


def beat(*, client: redis.Redis, queues: Iterable[str], hostname: str, ttl: float) -> None:
    """Say that ``hostname`` consumes ``queues`` now, for ``ttl`` seconds."""
    seconds = max(1, math.ceil(ttl))
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.set(f"{PREFIX}{queue}:{hostname}", int(time.time()), ex=seconds)
            # Any worker's beat: whether a queue is consumed at all, in one lookup.
            pipe.set(consumed_key(queue), int(time.time()), ex=seconds)
        pipe.execute()


def consumed_key(queue: str) -> str:
    """The key that exists while some worker has beaten for ``queue`` within its ttl."""
    return f"{PREFIX}{queue}"


def consumed(*, client: redis.Redis, queue: str) -> bool:
    """Whether a worker consuming ``queue`` has beaten within its ttl (True if Redis
    cannot say: the caller then acts as if it had)."""
    try:
        return bool(client.exists(consumed_key(queue)))
    except redis.RedisError:
        return True


def forget(*, client: redis.Redis, queues: Iterable[str], hostname: str) -> None:
    """A worker that stops says so rather than waiting for its keys to expire."""
    names = [f"{PREFIX}{queue}:{hostname}" for queue in queues]
    if names:
        client.delete(*names)


def _beating(client: redis.Redis, queue: str) -> Iterator[str]:
    """The hostnames of the workers of ``queue`` with a heartbeat within their ttl."""
    prefix = f"{PREFIX}{queue}:"
    for key in client.scan_iter(match=f"{prefix}*", count=500):
        name = key.decode() if isinstance(key, bytes) else str(key)
        yield name[len(prefix) :]


def workers_seen(*, client: redis.Redis, queues: Iterable[str] = QUEUES) -> dict[str, int]:
    """How many workers each queue has had a heartbeat from within their ttl."""
    return {queue: sum(1 for _ in _beating(client, queue)) for queue in queues}


def nodes_seen(*, client: redis.Redis, queues: Iterable[str] = QUEUES) -> set[str]:
    """The worker nodes (hostnames) with a heartbeat within their ttl, on any queue."""
    return {node for queue in queues for node in _beating(client, queue)}


@dataclass
class Report:
    """Each part's state (``ok`` or why not) and the parts that fail."""

    checks: dict[str, str] = field(default_factory=dict)

    @property
    def failing(self) -> list[str]:
        return [name for name, state in self.checks.items() if state != "ok"]

    @property
    def ok(self) -> bool:
        return not self.failing


def _database(sessions: sessionmaker[Session]) -> str:
    try:
        with sessions() as session:
            session.execute(text("select 1"))
    except SQLAlchemyError as exc:
        return f"unavailable: {type(exc).__name__}"
    return "ok"


def _redis(client: redis.Redis) -> str:
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"unavailable: {type(exc).__name__}"
    return "ok"


def check(*, sessions: sessionmaker[Session], client: redis.Redis, workers: bool) -> Report:
    """The database and Redis answer; with ``workers``, every queue has a live worker."""
    report = Report({"database": _database(sessions), "redis": _redis(client)})
    if workers and report.checks["redis"] == "ok":
        try:
            seen = workers_seen(client=client)
        except redis.RedisError as exc:
            report.checks["redis"] = f"unavailable: {type(exc).__name__}"
            seen = {}
        for queue, count in seen.items():
            report.checks[f"workers.{queue}"] = "ok" if count else "no worker seen"
    elif workers:
        for queue in QUEUES:
            report.checks[f"workers.{queue}"] = "unknown: redis unavailable"
    return report
