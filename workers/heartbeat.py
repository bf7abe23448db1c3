"""A worker's heartbeat for /health/ready: a consumer bootstep with one small thread.

The thread runs in the worker's main process (not the pool), so a worker whose
pool is busy with long tasks still counts as alive; one whose main process is
gone stops refreshing its keys and drops out after ``worker_seen_within``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from celery import bootsteps

from dispatcher import health

log = logging.getLogger(__name__)


class Heartbeat(bootsteps.StartStopStep):
    """Refresh this worker's key for each queue it consumes, three times per ttl."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queues: list[str] = []

    def start(self, c: Any) -> None:
        settings = c.app.runtime.settings
        self._queues = sorted(q.name for q in c.task_consumer.queues)
        self._stop = threading.Event()
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
        ttl = settings.worker_seen_within

        def run() -> None:
            while True:
                try:
                    health.beat(client=client, queues=self._queues, hostname=c.hostname, ttl=ttl)
                except redis.RedisError as exc:
                    # Redis is also the broker: the consumer reconnects on its own,
                    # and the next beat says the worker is back.
                    log.warning("heartbeat not written: %s", exc)
                if self._stop.wait(ttl / 3):
                    break
            try:
                health.forget(client=client, queues=self._queues, hostname=c.hostname)
            except redis.RedisError:
                log.warning("heartbeat keys left to expire")
            client.close()

        self._thread = threading.Thread(target=run, name="dispatcher-heartbeat", daemon=True)
        self._thread.start()

    def stop(self, c: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    shutdown = stop
