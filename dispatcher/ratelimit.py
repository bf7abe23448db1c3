"""Global (cross-process, cross-host) rate limiting for message dispatch.

Celery's ``rate_limit`` is enforced per worker process, so N workers send N
times the configured rate.  Providers, however, throttle per account and per
channel *globally*.  This module keeps one shared schedule in Redis so every
worker on every host draws from the same budget.

The algorithm is GCRA (generic cell rate algorithm) with *reservation*: a
request never gets rejected; it books the next free slot and is told how long
to wait for it.  The worker then sleeps in place instead of re-queueing the
task, which keeps FIFO order intact.  Several limits (e.g. per-account and
per-channel) are booked together in one Lua script, i.e. one Redis round trip
per request, and the script uses the Redis server clock so clock skew between
hosts does not matter.

Sizing requests: a reservation of ``n`` tokens pushes every later caller back
by ``n / rate`` seconds, and the caller itself may wait up to ``max_wait`` or
longer while unable to react to cancellation.  Request tokens in small groups
(about ``rate * 0.5`` seconds' worth, e.g. 25 tokens at 50/s) so waits stay
short and cancels stay responsive.

Redis Cluster: all keys of one request must hash to the same slot; use a hash
tag in the prefix or keys (e.g. ``"dispatcher:rl:{acct:42}:..."``) if needed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from dispatcher import metrics

__all__ = ["Limit", "RateLimiter"]

logger = logging.getLogger(__name__)

# KEYS[i]   : per-limit key holding its TAT (theoretical arrival time), in
#             microseconds of Redis server time.
# ARGV[1]   : n, tokens requested (>= 1).
# ARGV[2]   : burst tolerance in microseconds (>= 0).
# ARGV[2+i] : emission interval of KEYS[i] in microseconds per token (1e6/rate).
# Returns the delay, in whole microseconds (rounded up), before the tokens may
# be used.  Always reserves; never rejects.
_GCRA_RESERVE_LUA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local n = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tats = {}
local start = now
for i, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key))
  if tat == nil or tat < now then
    tat = now
  end
  tats[i] = tat
  if tat - burst > start then
    start = tat - burst
  end
end
for i, key in ipairs(KEYS) do
  local tat = tats[i]
  if start > tat then
    tat = start
  end
  local new_tat = tat + n * tonumber(ARGV[i + 2])
  redis.call('SET', key, string.format('%.17g', new_tat))
  redis.call('PEXPIRE', key, math.ceil((new_tat - now) / 1000) + 1)
end
return math.ceil(start - now)
"""


@dataclass(frozen=True)
class Limit:
    """One rate limit: a Redis key suffix and its rate in tokens per second (0/None = unlimited)."""

    key: str
    rate: float | None


class RateLimiter:
    """Reserve tokens against one or more global GCRA limits stored in Redis."""

    def __init__(
        self,
        redis: redis.Redis,
        *,
        prefix: str = "dispatcher:rl:",
        burst: float = 0.0,
        max_wait: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Bind to Redis; ``burst``: GCRA tolerance (s); waits over ``max_wait`` (s) get logged."""
        if not (burst >= 0.0 and math.isfinite(burst)):
            raise ValueError(f"burst must be a finite number >= 0, got {burst!r}")
        if not max_wait > 0.0:
            raise ValueError(f"max_wait must be > 0, got {max_wait!r}")
        self._redis = redis
        self._prefix = prefix
        self._burst_us = burst * 1_000_000.0
        self._sleep = sleep
        self.max_wait = max_wait
        self._script = redis.register_script(_GCRA_RESERVE_LUA)

    def reserve(self, limits: Sequence[Limit], n: int = 1) -> float:
        """Book ``n`` tokens on all ``limits`` and return the seconds to wait before using them."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        intervals: dict[str, float] = {}
        for limit in limits:
            rate = limit.rate
            if rate is None or rate == 0 or rate == math.inf:
                continue
            if not rate > 0:
                raise ValueError(f"rate for {limit.key!r} must be >= 0 or None, got {rate!r}")
            key = self._prefix + limit.key
            interval = 1_000_000.0 / rate
            # The same key twice would be read twice and written twice; keep the stricter rate.
            intervals[key] = max(interval, intervals.get(key, 0.0))
        if not intervals:
            return 0.0
        args = [str(n), repr(self._burst_us), *(repr(v) for v in intervals.values())]
        delay_us = self._script(keys=list(intervals), args=args)
        return max(int(delay_us), 0) / 1_000_000.0

    def acquire(self, limits: Sequence[Limit], n: int = 1) -> float:
        """Reserve ``n`` tokens, sleep until they are usable and return the delay slept."""
        delay = self.reserve(limits, n)
        if delay > self.max_wait:
            logger.warning(
                "rate limit wait %.3fs exceeds max_wait %.3fs for %s (n=%d); "
                "request tokens in smaller groups",
                delay,
                self.max_wait,
                [limit.key for limit in limits],
                n,
            )
        metrics.rate_limit_waited(delay)
        if delay > 0:
            self._sleep(delay)
        return delay
