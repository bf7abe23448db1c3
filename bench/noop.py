"""A no-op Celery task on the Dispatcher's own Celery app: the broker's reference cost.

``celery -A bench.noop worker -Q bench-noop`` runs it with exactly the settings of
the real workers (same broker, acks_late, prefetch 1, task events...), because the
app is built by :func:`workers.celery_app.create_celery` from the same
``DISPATCHER_*`` environment. Each call increments a Redis counter, which is how
the benchmark counts completions.
"""

from __future__ import annotations

import os
from typing import Any

import redis

from workers.celery_app import create_celery

QUEUE = "bench-noop"
COUNTER = "bench:noop:done"

app = create_celery()
_client: dict[int, redis.Redis] = {}


def _redis() -> redis.Redis:
    # One client per process (prefork children must not share the parent's socket).
    pid = os.getpid()
    if pid not in _client:
        settings = app.runtime.settings
        _client[pid] = redis.Redis.from_url(settings.redis_url, socket_timeout=10)
    return _client[pid]


@app.task(name="bench_noop", queue=QUEUE)
def noop(**_: Any) -> None:
    """Do nothing but count the completion."""
    _redis().incr(COUNTER)
