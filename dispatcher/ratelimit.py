"""Global (cross-process, cross-host) rate limiting for message dispatch.

Celery's ``rate_limit`` is enforced per worker process, so N workers send N
times the configured rate.  Providers, however, throttle per account and per
channel *globally*.  This module keeps one shared schedule in Redis so every
worker on every host draws from the same budget.

The algorithm is GCRA (generic cell rate algorithm) with *reservation*: a
request books the next free slot and is told how long to wait for it, so
requests are served in the order they ask and the rate is exact.  A worker
must not hold a process for long, though: :meth:`RateLimiter.acquire` books
only when the slot is at most ``max_wait`` away (about a second) and otherwise
books nothing and returns the wait, so the caller can defer its work durably
and free the process.  Several limits (e.g. per-account and per-channel) are
booked together in one Lua script, i.e. one Redis round trip per request, and
the script uses the Redis server clock so clock skew between hosts does not
matter.

Sizing requests: a reservation of ``n`` tokens pushes every later caller back
by ``n / rate`` seconds.  Request tokens in small groups (about ``rate * 0.2``
seconds' worth, e.g. 20 tokens at 100/s) so waits stay short and cancels stay
responsive.

Redis Cluster: all keys of one request must hash to the same slot; use a hash
tag in the prefix or keys (e.g. ``"dispatcher:rl:{acct:42}:..."``) if needed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from dispatcher import metrics

__all__ = ["Grant", "Limit", "RateLimiter"]

# KEYS[i]   : per-limit key holding its TAT (theoretical arrival time), in
#             microseconds of Redis server time.
# ARGV[1]   : n, tokens requested (>= 1).
# ARGV[2]   : burst tolerance in microseconds (>= 0).
# ARGV[3]   : the longest acceptable delay in microseconds; < 0 for no bound.
# ARGV[3+i] : emission interval of KEYS[i] in microseconds per token (1e6/rate).
# Returns {booked, delay}: the delay, in whole microseconds (rounded up), before
# the tokens may be used, and 1 if they were booked. Over the bound nothing is
# written, so a refused request costs later callers nothing.
_GCRA_RESERVE_LUA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local n = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local bound = tonumber(ARGV[3])
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
local delay = math.ceil(start - now)
if bound >= 0 and delay > bound then
  return {0, delay}
end
for i, key in ipairs(KEYS) do
  local tat = tats[i]
  if start > tat then
    tat = start
  end
  local new_tat = tat + n * tonumber(ARGV[i + 3])
  redis.call('SET', key, string.format('%.17g', new_tat))
  redis.call('PEXPIRE', key, math.ceil((new_tat - now) / 1000) + 1)
end
return {1, delay}
"""


@dataclass(frozen=True)
class Limit:
    """One rate limit: a Redis key suffix and its rate in tokens per second (0/None = unlimited)."""

    key: str
    rate: float | None


@dataclass(frozen=True)
class Grant:
    """The answer to a request: booked or not, and the wait (s) for its slot."""

    booked: bool
    wait: float


class RateLimiter:
    """Reserve tokens against one or more global GCRA limits stored in Redis."""

    def __init__(
        self,
        redis: redis.Redis,
        *,
        prefix: str = "dispatcher:rl:",
        burst: float = 0.0,
        max_wait: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Bind to Redis; ``burst``: GCRA tolerance (s); ``max_wait``: the longest sleep (s)."""
        if not (burst >= 0.0 and math.isfinite(burst)):
            raise ValueError(f"burst must be a finite number >= 0, got {burst!r}")
        if not (max_wait > 0.0 and math.isfinite(max_wait)):
            raise ValueError(f"max_wait must be a finite number > 0, got {max_wait!r}")
        self._redis = redis
        self._prefix = prefix
        self._burst_us = burst * 1_000_000.0
        self._sleep = sleep
        self.max_wait = max_wait
        self._script = redis.register_script(_GCRA_RESERVE_LUA)

    def reserve(self, limits: Sequence[Limit], n: int = 1) -> float:
        """Book ``n`` tokens on all ``limits``, however far off, and return the seconds to wait."""
        return self._book(limits, n, bound=None).wait

    def acquire(self, limits: Sequence[Limit], n: int = 1) -> Grant:
        """Book ``n`` tokens if usable within ``max_wait`` and sleep until then; else book nothing.

        A refused request returns the wait it was quoted, so the caller can come
        back about then (``wait - max_wait`` later it would be booked).
        """
        grant = self.book(limits, n)
        if grant.booked:
            self.sleep(grant.wait)
        return grant

    def book(self, limits: Sequence[Limit], n: int = 1) -> Grant:
        """Like :meth:`acquire` without the sleep: the caller waits ``wait`` before using them."""
        return self._book(limits, n, bound=self.max_wait)

    def sleep(self, seconds: float) -> None:
        """Wait for a booked slot (bounded by ``max_wait``, whatever the caller computed)."""
        seconds = min(max(seconds, 0.0), self.max_wait)
        metrics.rate_limit_waited(seconds)
        if seconds > 0:
            self._sleep(seconds)

    def _book(self, limits: Sequence[Limit], n: int, *, bound: float | None) -> Grant:
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
            return Grant(booked=True, wait=0.0)
        bound_us = -1.0 if bound is None else bound * 1_000_000.0
        args = [
            str(n),
            repr(self._burst_us),
            repr(bound_us),
            *(repr(v) for v in intervals.values()),
        ]
        booked, delay_us = self._script(keys=list(intervals), args=args)
        return Grant(booked=bool(booked), wait=max(int(delay_us), 0) / 1_000_000.0)
