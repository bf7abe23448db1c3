"""Per-endpoint limits shared by every callback worker: a concurrency semaphore and a
circuit breaker, both in Redis.

An endpoint is an account's callback origin (scheme, host and port): a tenant that
puts ids in its callback URLs' paths or queries still gets one set of limits.

* The semaphore grants "lanes": each lane POSTs one callback after another over a
  kept-alive connection. Slots are leased (a sorted set scored by expiry), so a
  worker killed mid-POST frees its slots when the lease passes.
* The breaker opens after ``failures`` failed attempts in a row; while open, the
  endpoint gets no POSTs. After the cooldown one probe is let through (half-open);
  its success closes the breaker, its failure opens it again for twice as long
  (capped).

Redis's own clock (TIME) is used, so workers on hosts with skewed clocks agree.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis

__all__ = ["EndpointGate", "Grant", "endpoint_key"]

log = logging.getLogger(__name__)

_PREFIX = "dispatcher:callbacks:endpoint:"
# While the half-open probe is out, others look again this soon rather than after its lease.
_PROBE_RECHECK_MS = 5000
# Slots a process keeps to give back later, at most (older ones have expired meanwhile).
_MAX_UNRELEASED = 10_000

# KEYS: slots, breaker. ARGV: lease ms, limit, wanted lanes, token prefix, probe recheck ms.
# Returns {wait_ms, probe, counting, busy_ms, token...}: wait_ms > 0 means the breaker
# holds the endpoint; counting, that it has failures on record (a success must reset
# them); busy_ms, at the limit, how long the oldest slot has been held.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local probe = 0
local open_until = tonumber(redis.call('HGET', KEYS[2], 'open_until') or '0')
local dirty = redis.call('EXISTS', KEYS[2])
if open_until > 0 then
  if now < open_until then return {open_until - now, 0, 1} end
  local probing = tonumber(redis.call('HGET', KEYS[2], 'probe_until') or '0')
  -- The probe's outcome may come well before its lease: look again soon.
  if probing > now then return {math.min(probing - now, tonumber(ARGV[5])), 0, 1} end
  probe = 1
  want = 1
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local free = limit - redis.call('ZCARD', KEYS[1])
if free < want then want = free end
local out = {0, probe, dirty}
if want < 1 then
  -- At the limit: say how long the oldest slot has been held (a slow endpoint
  -- holds them for long, so callers wait longer before they look again).
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local busy = 0
  if oldest[2] then busy = now - (tonumber(oldest[2]) - lease) end
  return {0, probe, dirty, busy}
end
out[#out + 1] = 0
for i = 1, want do
  local token = ARGV[4] .. ':' .. i
  redis.call('ZADD', KEYS[1], now + lease, token)
  out[#out + 1] = token
end
if want > 0 then
  redis.call('PEXPIRE', KEYS[1], 2 * lease)
  if probe == 1 then
    redis.call('HSET', KEYS[2], 'probe_until', now + lease)
  end
end
return out
"""

# KEYS: breaker. ARGV: ok (1/0), probe (1/0), failures to open, cooldown ms, max cooldown ms.
# Returns the breaker's open time left in ms (0 when closed).
_REPORT = """
if ARGV[1] == '1' then
  redis.call('DEL', KEYS[1])
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fails = redis.call('HINCRBY', KEYS[1], 'fails', 1)
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
local cooldown = tonumber(ARGV[4])
if ARGV[2] == '1' then
  local opens = redis.call('HINCRBY', KEYS[1], 'opens', 1)
  cooldown = math.min(cooldown * 2 ^ (opens - 1), tonumber(ARGV[5]))
  open_until = now + cooldown
  redis.call('HSET', KEYS[1], 'open_until', open_until, 'probe_until', 0)
elseif open_until == 0 and fails >= tonumber(ARGV[3]) then
  open_until = now + cooldown
  redis.call('HSET', KEYS[1], 'open_until', open_until, 'opens', 1)
end
redis.call('PEXPIRE', KEYS[1], 7 * 86400 * 1000)
if open_until > now then return open_until - now end
return 0
"""


# KEYS: slots, breaker. Returns {breaker wait ms, busy ms}: how long the breaker still
# holds the endpoint, and (all slots taken) how long the oldest slot has been held.
_PEEK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local open_until = tonumber(redis.call('HGET', KEYS[2], 'open_until') or '0')
local wait = 0
if open_until > now then
  wait = open_until - now
elseif open_until > 0 then
  -- Half-open: while its probe is out, nothing else goes (look again soon).
  local probing = tonumber(redis.call('HGET', KEYS[2], 'probe_until') or '0')
  if probing > now then wait = math.min(probing - now, tonumber(ARGV[3])) end
end
local busy = 0
if redis.call('ZCOUNT', KEYS[1], now, '+inf') >= limit then
  local oldest = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if oldest[2] then busy = math.max(1, now - (tonumber(oldest[2]) - lease)) end
end
return {wait, busy}
"""


def endpoint_key(account_id: str, url: str) -> str:
    """The limits key of a callback URL: the account and the URL's origin."""
    try:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{(parts.hostname or '').lower()}:{parts.port or ''}"
    except ValueError:
        origin = url  # an unparsable URL fails at the SSRF check; limit it on its own
    return hashlib.sha256(f"{account_id}\n{origin}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Grant:
    """What the gate allows for one endpoint now."""

    tokens: tuple[str, ...]  # one per lane granted (empty: at the limit, or held)
    probe: bool  # the single lane is the half-open breaker's probe
    wait: float  # > 0: the breaker holds the endpoint for this many seconds
    # The breaker has failures on record: the next answer must be reported to reset
    # them. When false, answers need no report (no Redis round trip per POST).
    counting: bool = False
    busy: float = 0.0  # no slot free: how long the oldest has been held (s)


class _Unreleased:
    """Slots this process could not give back (Redis failed), given back by its next gate
    call that reaches Redis: kept in Redis (an append-only file), they would otherwise
    hold the endpoint's callbacks back until their lease passed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: list[tuple[str, str]] = []

    def add(self, slots: list[tuple[str, str]]) -> None:
        with self._lock:
            self._slots[:0] = slots
            del self._slots[_MAX_UNRELEASED:]

    def give_back(self, client: redis.Redis) -> None:
        """Give them back; on a Redis error keep them and raise it."""
        with self._lock:
            slots, self._slots = self._slots, []
        if not slots:
            return
        try:
            with client.pipeline(transaction=False) as pipe:
                for key, token in slots:
                    pipe.zrem(f"{_PREFIX}{key}:slots", token)
                pipe.execute()
        except redis.RedisError:
            self.add(slots)
            raise


_unreleased = _Unreleased()


class EndpointGate:
    """Concurrency slots and a circuit breaker per endpoint, shared through Redis."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        limit: int,
        lease: float,
        failures: int,
        cooldown: float,
        max_cooldown: float,
    ) -> None:
        """``lease``: how long a slot outlives a worker that never released it."""
        self._redis = client
        self._limit = limit
        self._lease_ms = int(lease * 1000)
        self._failures = failures
        self._cooldown_ms = int(cooldown * 1000)
        self._max_cooldown_ms = int(max(cooldown, max_cooldown) * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        self._report = client.register_script(_REPORT)
        self._peek = client.register_script(_PEEK)

    def acquire(self, key: str, lanes: int) -> Grant:
        """Up to ``lanes`` slots on the endpoint, unless its breaker holds it."""
        _unreleased.give_back(self._redis)
        reply = self._acquire(
            keys=[f"{_PREFIX}{key}:slots", f"{_PREFIX}{key}:breaker"],
            args=[
                self._lease_ms,
                self._limit,
                max(0, lanes),
                secrets.token_hex(8),
                _PROBE_RECHECK_MS,
            ],
        )
        wait_ms, probe, counting, *rest = reply
        busy_ms, tokens = (rest[0], rest[1:]) if rest else (0, [])
        return Grant(
            tokens=tuple(t.decode() if isinstance(t, bytes) else str(t) for t in tokens),
            probe=bool(int(probe)),
            wait=int(wait_ms) / 1000,
            counting=bool(int(counting)),
            busy=int(busy_ms) / 1000,
        )

    def held_for(self, key: str) -> tuple[float, float]:
        """Without taking a slot: (seconds the breaker still holds the endpoint, seconds
        its oldest slot has been held if none is free); both 0 when it can take work."""
        _unreleased.give_back(self._redis)
        wait_ms, busy_ms = self._peek(
            keys=[f"{_PREFIX}{key}:slots", f"{_PREFIX}{key}:breaker"],
            args=[self._lease_ms, self._limit, _PROBE_RECHECK_MS],
        )
        return int(wait_ms) / 1000, int(busy_ms) / 1000

    def release(self, key: str, token: str) -> None:
        """Give a slot back; never raises.

        Callers release after POSTing, before recording the outcomes: a Redis that is
        down then must not cost them (the lane's callbacks would wait for the delivery
        lease and be POSTed again). A slot it could not give back is given back by this
        process's next gate call that reaches Redis, or freed when its lease passes.
        """
        try:
            self._redis.zrem(f"{_PREFIX}{key}:slots", token)
        except redis.RedisError:
            _unreleased.add([(key, token)])
            log.warning("endpoint slot not released yet (Redis failed)", exc_info=True)

    def report(self, key: str, *, ok: bool, probe: bool) -> float:
        """Count one attempt's outcome; returns how long the breaker is now open (s), 0
        if Redis failed (never raises).

        Lanes report while they POST: a Redis that fails then must not cost them the
        outcomes they hold (the callbacks would wait for the delivery lease and be
        POSTed again). The breaker is best effort: it misses this attempt.
        """
        try:
            left = self._report(
                keys=[f"{_PREFIX}{key}:breaker"],
                args=[
                    1 if ok else 0,
                    1 if probe else 0,
                    self._failures,
                    self._cooldown_ms,
                    self._max_cooldown_ms,
                ],
            )
        except redis.RedisError:
            log.warning("endpoint breaker not updated (Redis failed)", exc_info=True)
            return 0.0
        return int(left) / 1000
