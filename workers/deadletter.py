"""Poison messages: a task whose worker dies on every delivery is set aside, not retried forever.

With ``acks_late`` and ``reject_on_worker_lost`` a task that kills its process
(a segfault, ``os._exit``, the hard time limit) goes back to the queue and is
delivered again, forever. The task base counts the deliveries of each task id
that did not finish; past the limit the task is recorded here and acknowledged
without running. A delivery that finishes, well or with an error, clears its count.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import redis

log = logging.getLogger(__name__)

DEAD_LETTERS = "dispatcher:dead-letters"
DELIVERIES = "dispatcher:deliveries:"
# The list keeps the newest this many; older entries are only in the logs.
KEEP = 10_000


def count_delivery(client: redis.Redis, task_id: str, *, ttl: float) -> int:
    """Count one more delivery of ``task_id`` that has not finished yet; returns the count."""
    key = DELIVERIES + task_id
    with client.pipeline() as pipe:
        pipe.incr(key)
        pipe.expire(key, max(1, int(ttl)))
        count, _ = pipe.execute()
    return int(count)


def finished(client: redis.Redis, task_id: str) -> None:
    """The delivery of ``task_id`` ended without killing its process."""
    client.delete(DELIVERIES + task_id)


def dead_letter(
    client: redis.Redis,
    *,
    task: str,
    task_id: str,
    args: Any,
    kwargs: Any,
    deliveries: int,
) -> None:
    """Record a poison task (newest first) so that an operator can look at it and replay it."""
    entry = {
        "task": task,
        "id": task_id,
        "args": args,
        "kwargs": kwargs,
        "deliveries": deliveries,
        "at": datetime.now(UTC).isoformat(),
    }
    log.error(
        "dead-lettered %s[%s] after %d deliveries that killed their worker",
        task,
        task_id,
        deliveries,
    )
    with client.pipeline() as pipe:
        pipe.lpush(DEAD_LETTERS, json.dumps(entry, default=str))
        pipe.ltrim(DEAD_LETTERS, 0, KEEP - 1)
        pipe.delete(DELIVERIES + task_id)
        pipe.execute()


def dead_letters(client: redis.Redis, limit: int = 100) -> list[dict[str, Any]]:
    """The newest dead-lettered tasks."""
    return [json.loads(raw) for raw in client.lrange(DEAD_LETTERS, 0, limit - 1)]
