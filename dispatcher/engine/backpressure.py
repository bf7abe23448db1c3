"""Backpressure from callbacks on sending: unthrottled sending waits while callbacks queue up.

Every status change writes its callback in the same transaction, so sending makes
callbacks at up to three times its own rate (queued, sent, delivered). Where the CPUs
are the limit, the send and callback workers share them, and without a bound the
callbacks fall further behind for as long as a large batch sends: a client hears of
its messages minutes after they went out. So before each group of an unthrottled
send, the worker looks at the broker's ``callbacks`` queue. While at least
``callback_backpressure`` deliver tasks wait there for a worker, it waits in place
(looking again every POLL seconds) for what is left of its ``send_time_slice``; if
callbacks are still behind then, its work goes to the tail of the send queue and the
process moves on, as a rate-limited task's rest does. A send process so never waits
longer than a rate-limited one, and sending resumes within POLL of callbacks
catching up.

What never waits:

* a batch of fewer than BULK recipients: transactional traffic (a code, an alert)
  goes out at once, whatever another tenant's bulk send has queued;
* rate-limited work, which its limits pace.

What it never waits for:

* callbacks that are not due, or whose endpoint the gate holds (breaker open, every
  slot taken): the deliver task defers those in the database, out of the queue. A
  slow receiver holds a callback process for at most ``callback_task_wait`` per
  task, so it can lengthen the queue only as any other work of that size would;
* a queue nobody consumes: without a live callback worker (its heartbeat), sending
  goes on and ``/health/ready`` reports the missing worker instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from dispatcher import health, metrics
from dispatcher.outbox import QueueName

__all__ = ["CallbackBackpressure"]

# Batches smaller than this never wait (see above).
BULK = 100
# How often a waiting send worker looks at the queue again.
POLL = 0.05

_LISTS = metrics.queue_lists(QueueName.CALLBACKS.value)
# Exists while a callback worker has beaten within worker_seen_within (dispatcher.health).
_ALIVE = health.consumed_key(QueueName.CALLBACKS.value)


class CallbackBackpressure:
    """The callbacks queue as a send worker sees it (one per process)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        limit: int,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.limit = limit
        self._monotonic = monotonic
        self._sleep = sleep

    def applies_to(self, recipient_count: int) -> bool:
        """Whether a batch of ``recipient_count`` recipients waits for callbacks at all."""
        return bool(self.limit) and recipient_count >= BULK

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` while callbacks are behind; True if they still are.

        A Redis error ends the wait as if callbacks had caught up: backpressure is a
        brake, never a reason not to send.
        """
        if not self.limit:
            return False
        started = self._monotonic()
        until = started + seconds
        behind = slept = False
        try:
            while behind := self._behind():
                left = until - self._monotonic()
                if left <= 0:
                    break
                self._sleep(min(POLL, left))
                slept = True
        except redis.RedisError:
            behind = False
        if slept:
            metrics.send_backpressure(self._monotonic() - started)
        return behind

    def _behind(self) -> bool:
        """At least ``limit`` deliver tasks waiting, and a callback worker alive to take them."""
        with self.client.pipeline(transaction=False) as pipe:
            for key in _LISTS:
                pipe.llen(key)
            pipe.exists(_ALIVE)
            *lengths, alive = pipe.execute()
        return sum(lengths) >= self.limit and bool(alive)
