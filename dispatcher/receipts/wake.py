"""Held receipts applied when they are due, not at the next periodic run.

Two providers hold receipts in Redis for a worker to apply: the simulator until each
one's due time, the SMPP connector from the moment it reads a ``deliver_sm`` (applying
them there would put the database in its loop). The ``simulator_receipts`` task
applies both, and beat runs it every second, so a receipt used to wait up to a second
for it: its ``delivered`` callback came that much later, and a bulk send's last
callbacks trailed its last hand-off by that second too.

Whoever stores a receipt now also asks for that task at the receipt's due time: one
task per SLOT seconds of due time, however many hand-off groups or receipt reads fall
in it (a Redis ``SET NX`` decides which caller publishes). Beat's run stays, for a
wake-up that was never published (Redis or the broker failing) or never ran.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime

import redis

from dispatcher import outbox
from dispatcher.outbox import TaskName

__all__ = ["ReceiptWaker"]

log = logging.getLogger(__name__)

# Receipts due within one slot share a wake-up (at the slot's end): at most 1/SLOT
# tasks a second, receipts applied at most SLOT after they are due.
SLOT = 0.05
_KEY = "dispatcher:receipts:wake:{}:{}"
# A wake-up not run this long after its time is dropped: beat's run applies the receipts.
EXPIRES = 30.0
# Receipts due later than this are left to beat's run: a wake-up is an ETA task, held in
# every worker's memory until due (and re-delivered by Redis past the visibility timeout),
# and a long simulated receipt delay would hold one per slot of sending.
HORIZON = 60.0


class ReceiptWaker:
    """Asks for the receipts task at the time held receipts become due (one per process)."""

    def __init__(
        self,
        client: redis.Redis,
        publisher: outbox.Publisher,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = client
        self.publisher = publisher
        self.clock = clock

    def at(self, due: float, *, task: TaskName = TaskName.SIMULATOR_RECEIPTS) -> None:
        """Have the receipts due at ``due`` (epoch seconds) applied then; never raises.

        ``task``: the receipts task, or ``sweep_receipts`` for a second look at receipts
        stored while their outcome was being recorded (see workers/tasks.py).
        """
        now = self.clock()
        if due - now > HORIZON:
            return
        slot = math.ceil(max(due, now) / SLOT)
        wake = slot * SLOT
        ahead = wake - now
        key = _KEY.format(task.value, slot)
        try:
            # The key outlives its slot, so a late caller for the same slot stays quiet.
            if not self.redis.set(key, b"", nx=True, px=int(1000 * (ahead + 5))):
                return
        except redis.RedisError:
            # Beat's run applies them within its interval: a wake-up is only sooner.
            log.warning("receipts wake-up for %.3f skipped: Redis failed", due, exc_info=True)
            return
        eta = datetime.fromtimestamp(wake, UTC).replace(tzinfo=None) if ahead > 0 else None
        try:
            self.publisher.publish([outbox.Message(task, eta=eta, expires=ahead + EXPIRES)])
        except Exception:
            # Whatever the broker client raised: the slot is freed for the next caller.
            log.warning("receipts wake-up for %.3f not published", due, exc_info=True)
            with contextlib.suppress(redis.RedisError):
                self.redis.delete(key)
