"""A deterministic carrier simulator: the embedded default, the demo, tests and benchmarks.

Rules come from configuration (``DISPATCHER_SIMULATOR``, JSON)::

    {"latency_ms": 0,                      # per message
     "receipt_delay": 2.0,                 # seconds until the delivery receipt
     "unreachable": {"rcs": ["^\\\\+4477"]}, # regexes: permanent failure on that channel
     "invalid": ["^\\\\+999"],               # permanent failure for the recipient
     "transient": {"sms": {"pattern": "^\\\\+4478", "times": 1}},  # fail the first N tries
     "fail_rate": {"sms": 0.0},            # share of tries failing transiently (hashed, repeatable)
     "undeliverable": ["^\\\\+4479"]}        # accepted, then a "failed" receipt

Like a real carrier it keeps its own ledger (in Redis): every hand-off is counted
per idempotency key, so tests can prove nothing was handed over twice, and a
lost worker's claims can be looked up.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import redis

from dispatcher.channels.base import (
    RECEIPT_CLAIM_STALE_S,
    Lookup,
    OutboundMessage,
    Outcome,
    Provider,
    Receipt,
    SendResult,
)

LEDGER = "dispatcher:sim:accepted"
HANDOFFS = "dispatcher:sim:handoffs"
RECEIPTS = "dispatcher:sim:receipts"
# Receipts a worker took and has not committed yet: one sorted set per claim (their due
# times kept), and the claims by when they were made.
RECEIPT_CLAIMS = "dispatcher:sim:receipts:claims"

# KEYS: handoffs, ledger, receipts. ARGV: the receipts' due time, the receipt JSON before
# and after its message id (delivered, then failed), then one JSON array of every message's
# idempotency key, provider message id ("" unless accepted) and 1 if its receipt fails.
# One argument for the whole group: packing three per message was most of the call's CPU.
RECORD_HANDOFFS = """
local heads, tails = {ARGV[2], ARGV[4]}, {ARGV[3], ARGV[5]}
local entries = cjson.decode(ARGV[6])
for i = 1, #entries, 3 do
  local key, ref = entries[i], entries[i + 1]
  redis.call('HINCRBY', KEYS[1], key, 1)
  if ref ~= '' then
    local failed = entries[i + 2] + 1
    redis.call('HSET', KEYS[2], key, ref)
    redis.call('ZADD', KEYS[3], ARGV[1], heads[failed] .. cjson.encode(ref) .. tails[failed])
  end
end
return 0
"""

# KEYS: receipts, claims, this claim. ARGV: now, limit, stale before. Gives claims left
# by killed workers back, then moves the due receipts (the lowest scores, so the first
# ranks) to this claim atomically and returns them as one reply, a line each (JSON has
# no raw newline). They stay there until the worker's commit (or requeue).
POP_DUE = """
for _, key in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])) do
  redis.call('ZUNIONSTORE', KEYS[1], 2, KEYS[1], key, 'AGGREGATE', 'MIN')
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[2], key)
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[2])
if #due == 0 then return '' end
local members = {}
for i = 1, #due, 2 do members[#members + 1] = due[i] end
for i = 1, #due, 1000 do
  local batch = {}
  for j = i, math.min(i + 999, #due), 2 do
    batch[#batch + 1] = due[j + 1]
    batch[#batch + 1] = due[j]
  end
  redis.call('ZADD', KEYS[3], unpack(batch))
end
redis.call('ZADD', KEYS[2], ARGV[1], KEYS[3])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, #members - 1)
return table.concat(members, '\\n')
"""


# The two receipts the simulator gives, but for their message id: delivered, failed.
STORED = (
    Receipt(provider_message_id="", status="delivered"),
    Receipt("", "failed", error_code="undeliverable", error_text="handset unreachable"),
)


def _receipt_json(receipt: Receipt) -> tuple[str, str]:
    """The JSON of a receipt before and after its message id (the first field), built once."""
    head, tail = json.dumps(receipt.__dict__).split('""', 1)
    return head, tail


# The JSON before and after the message id: delivered, then failed (RECORD_HANDOFFS's ARGV).
RECEIPT_JSON = (*_receipt_json(STORED[0]), *_receipt_json(STORED[1]))
# A stored receipt by the JSON after its message id (the JSON before it is the same).
BY_TAIL = {_receipt_json(r)[1]: r for r in STORED}
HEAD = RECEIPT_JSON[0]


def _parse(member: str) -> Receipt:
    """A stored receipt: one the script built is cut at its message id, not parsed as JSON.

    Decoding each receipt's JSON object and passing its fields by name cost 2.9-3.9 us
    a receipt, the cut 2.2-2.7 (the rest is the frozen dataclass's ``__init__``).
    """
    for tail, stored in BY_TAIL.items():
        if member.endswith(tail) and member.startswith(HEAD):
            ref = member[len(HEAD) : -len(tail)]
            # A JSON string without escapes is its text in quotes.
            ref = json.loads(ref) if "\\" in ref else ref[1:-1]
            return Receipt(ref, stored.status, stored.error_code, stored.error_text)
    return Receipt(**json.loads(member))


def _accepted(key: str) -> SendResult:
    """An acceptance: the message id is derived from the idempotency key (repeatable)."""
    return SendResult(Outcome.ACCEPTED, provider_message_id=f"sim-{key}")


def _compile(patterns: Sequence[str]) -> list[re.Pattern[str]]:
    return [re.compile(p) for p in patterns]


class Simulator(Provider):
    name = "simulator"
    handoff_group = 50

    def __init__(
        self,
        *,
        redis_client: redis.Redis,
        rules: dict[str, Any],
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        wake: Callable[[float], None] | None = None,
    ) -> None:
        self.redis = redis_client
        self.latency = float(rules.get("latency_ms", 0)) / 1000
        # The sender checks its lease between groups: small ones only when each message
        # takes time; without latency a chunk is one ledger call.
        self.handoff_group = 50 if self.latency else 1000
        self.receipt_delay = float(rules.get("receipt_delay", 2.0))
        self.unreachable = {ch: _compile(p) for ch, p in rules.get("unreachable", {}).items()}
        self.invalid = _compile(rules.get("invalid", []))
        self.undeliverable = _compile(rules.get("undeliverable", []))
        self.transient = {
            ch: (re.compile(r["pattern"]), int(r.get("times", 1)))
            for ch, r in rules.get("transient", {}).items()
        }
        self.fail_rate = {ch: float(v) for ch, v in rules.get("fail_rate", {}).items()}
        self.sleep = sleep
        self.clock = clock
        # Asks for the receipts task when this group's receipts are due (receipts/wake.py).
        self.wake = wake
        # Per channel: no rule applies, so every message is accepted (see send_many).
        self._plain: dict[str, bool] = {}
        self._record = redis_client.register_script(RECORD_HANDOFFS)
        self._pop_due = redis_client.register_script(POP_DUE)
        self._claim: str | None = None  # the receipts this process took last

    def _no_rule_for(self, channel: str) -> bool:
        """Whether no rule can turn a message on ``channel`` away (then each is accepted)."""
        return not (
            self.invalid
            or self.unreachable.get(channel)
            or channel in self.transient
            or self.fail_rate.get(channel)
        )

    def _decide(self, m: OutboundMessage, key: str) -> SendResult:
        if any(p.search(m.to) for p in self.invalid):
            return SendResult(Outcome.RECIPIENT, error_code="invalid", error_text="number invalid")
        if any(p.search(m.to) for p in self.unreachable.get(m.channel, ())):
            return SendResult(
                Outcome.CHANNEL,
                error_code="unreachable",
                error_text=f"recipient not reachable on {m.channel}",
            )
        rule = self.transient.get(m.channel)
        if rule and rule[0].search(m.to) and m.attempt <= rule[1]:
            return SendResult(Outcome.TRANSIENT, error_code="busy", error_text="carrier busy")
        rate = self.fail_rate.get(m.channel, 0.0)
        if rate:
            digest = hashlib.sha256(f"{key}:{m.attempt}".encode()).digest()
            if int.from_bytes(digest[:4], "big") / 2**32 < rate:
                return SendResult(Outcome.TRANSIENT, error_code="busy", error_text="carrier busy")
        return _accepted(key)

    def send(self, message: OutboundMessage) -> SendResult:
        return self.send_many([message])[0]

    def send_many(self, messages: Sequence[OutboundMessage]) -> list[SendResult]:
        results = []
        # One script call records the whole group in the ledger (one round trip), its
        # entries one JSON argument: the script builds each receipt from its message id.
        entries: list[str | int] = []
        undeliverable = self.undeliverable
        for m in messages:
            if self.latency:
                self.sleep(self.latency)
            key = m.idempotency_key
            plain = self._plain.get(m.channel)
            if plain is None:
                plain = self._plain[m.channel] = self._no_rule_for(m.channel)
            # No rule for the channel: accepted (what _decide answers, without its checks).
            result = _accepted(key) if plain else self._decide(m, key)
            ref = result.provider_message_id or ""
            results.append(result)
            failed = (
                1 if ref and undeliverable and any(p.search(m.to) for p in undeliverable) else 0
            )
            entries += (key, ref, failed)
        if entries:
            due = self.clock() + self.receipt_delay
            args: list[str | float] = [due, *RECEIPT_JSON, json.dumps(entries)]
            self._record(keys=[HANDOFFS, LEDGER, RECEIPTS], args=args)
            # Only accepted messages (a message id) get a receipt.
            if self.wake is not None and any(entries[1::3]):
                self.wake(due)
        return results

    def lookup(
        self, message: OutboundMessage, *, claimed_at: datetime | None = None
    ) -> tuple[Lookup, str | None]:
        found = self.redis.hget(LEDGER, message.idempotency_key)
        if found is None:
            return Lookup.NOT_FOUND, None
        return Lookup.ACCEPTED, found.decode() if isinstance(found, bytes) else str(found)

    def due_receipts(self, *, limit: int = 2000) -> list[Receipt]:
        """Claim receipts whose delay has passed (at most ``limit``, the oldest first).

        They stay in Redis under this worker's claim until ``receipts_applied`` (after
        the commit) or ``requeue_receipts``; a claim left by a killed worker is given
        back once it is older than any task can run.
        """
        # One script: two pollers never take the same receipt.
        claim = f"{RECEIPT_CLAIMS}:{uuid.uuid4().hex}"
        now = self.clock()
        found = self._pop_due(
            keys=[RECEIPTS, RECEIPT_CLAIMS, claim], args=[now, limit, now - RECEIPT_CLAIM_STALE_S]
        )
        text = found.decode() if isinstance(found, bytes) else found
        due = [_parse(member) for member in text.split("\n")] if text else []
        self._claim = claim if due else None
        return due

    def receipts_applied(self) -> None:
        """The claimed receipts are committed: forget the claim."""
        if self._claim is not None:
            with self.redis.pipeline() as pipe:
                pipe.delete(self._claim)
                pipe.zrem(RECEIPT_CLAIMS, self._claim)
                pipe.execute()
            self._claim = None

    def requeue_receipts(self, receipts: Sequence[Receipt]) -> None:
        """Give the claimed receipts back (the worker could not apply them), due as before."""
        if self._claim is not None:
            with self.redis.pipeline() as pipe:  # MULTI: all or nothing
                pipe.zunionstore(RECEIPTS, [RECEIPTS, self._claim], aggregate="MIN")
                pipe.delete(self._claim)
                pipe.zrem(RECEIPT_CLAIMS, self._claim)
                pipe.execute()
            self._claim = None

    def handoffs(self) -> dict[str, int]:
        """Every idempotency key handed over, with how many times (for tests)."""
        return {
            (k.decode() if isinstance(k, bytes) else k): int(v)
            for k, v in self.redis.hgetall(HANDOFFS).items()
        }
