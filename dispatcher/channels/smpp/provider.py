"""The ``smpp`` provider: hands messages to the connector process through Redis.

Send workers hold no SMPP bind: binds live in the connector (see
``connector.py`` and docs/smpp.md), which answers ``enquire_link`` and
``deliver_sm`` whether or not a task is running. ``send_many`` routes each
message to a carrier with a live connection, pushes one request per carrier
and waits, bounded, for the answers. A message whose submit may have reached
the SMSC without its ``submit_sm_resp`` is never reported as safe to resend.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import redis

from dispatcher.channels.base import (
    RECEIPT_CLAIM_STALE_S,
    Lookup,
    OutboundMessage,
    Outcome,
    Provider,
    SendResult,
)
from dispatcher.channels.smpp import handoff
from dispatcher.channels.smpp.config import SmppConfig
from dispatcher.routes import RouteTable

if TYPE_CHECKING:
    from dispatcher.channels.base import Receipt

logger = logging.getLogger(__name__)

# The connector stops starting submits this long before the worker stops waiting.
MARGIN = 2.0
# Seconds per blocking read of the reply (below Runtime.redis's 10 s socket timeout).
BLOCK_SLICE = 5.0


CLAIM_STALE_S = RECEIPT_CLAIM_STALE_S
# Give stale claims back to the head of the list, then move up to ARGV[3] groups from
# the list to this claim (KEYS[3]) and record it (ARGV[1] now, ARGV[2] stale before).
CLAIM_RECEIPTS = """
for _, key in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])) do
  local groups = redis.call('LRANGE', key, 0, -1)
  for i = #groups, 1, -1 do redis.call('LPUSH', KEYS[1], groups[i]) end
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[2], key)
end
local groups = redis.call('LPOP', KEYS[1], ARGV[3])
if not groups then return {} end
redis.call('RPUSH', KEYS[3], unpack(groups))
redis.call('ZADD', KEYS[2], ARGV[1], KEYS[3])
return groups
"""

# Push a request (KEYS[1] the carrier's list, ARGV[1]) and return the data's generation
# (KEYS[2]), made ARGV[2] ("<unix time>:<request id>") if there is none yet: one round
# trip, as the RPUSH alone was.
PUSH = """
redis.call('SET', KEYS[2], ARGV[2], 'NX')
redis.call('RPUSH', KEYS[1], ARGV[1])
return redis.call('GET', KEYS[2])
"""


class SmppProvider(Provider):
    name = "smpp"
    handoff_group = 200

    def __init__(
        self,
        *,
        redis_client: redis.Redis,
        config: SmppConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis_client
        self.config = config
        self.routes = RouteTable(config.routes)
        self.clock = clock
        self._claim_script = redis_client.register_script(CLAIM_RECEIPTS)
        self._push_script = redis_client.register_script(PUSH)
        self._claim: str | None = None  # the receipt groups this process took last

    def live_carriers(self) -> set[str]:
        """Carriers with at least one connection bound for sending right now."""
        conns = self.config.connections
        flags = self.redis.mget([handoff.alive_key(c.name) for c in conns]) if conns else []
        return {c.carrier for c, flag in zip(conns, flags, strict=True) if flag}

    def send(self, message: OutboundMessage) -> SendResult:
        return self.send_many([message])[0]

    def send_many(self, messages: Sequence[OutboundMessage]) -> list[SendResult]:
        results: list[SendResult | None] = [None] * len(messages)
        live = self.live_carriers()
        by_carrier: dict[str, list[int]] = defaultdict(list)
        for i, m in enumerate(messages):
            routes = self.routes.candidates(channel=m.channel, to=m.to, account_id=m.account_id)
            if not routes:
                # Named by channel too: rcs or whatsapp may be routed to SMPP by mistake.
                text = f"no SMPP route for channel {m.channel} to {m.to}"
                results[i] = SendResult(Outcome.CHANNEL, error_code="no_route", error_text=text)
                continue
            carrier = next((r.carrier for r in routes if r.carrier in live), None)
            if carrier is None:
                results[i] = SendResult(
                    Outcome.TRANSIENT,
                    error_code="no_live_bind",
                    error_text="no connection of any route is bound",
                    retry_after=5.0,
                )
                continue
            by_carrier[carrier].append(i)
        pending = {
            carrier: self._push(carrier, [messages[i] for i in idx])
            for carrier, idx in by_carrier.items()
        }
        for carrier, (request_id, payload, give_up, generation) in pending.items():
            answers = self._wait(carrier, request_id, payload, give_up, generation)
            for i, answer in zip(by_carrier[carrier], answers, strict=True):
                results[i] = answer
        return [r if r is not None else handoff.unknown() for r in results]

    def _push(self, carrier: str, messages: list[OutboundMessage]) -> tuple[str, str, float, bytes]:
        request_id = uuid.uuid4().hex
        now = self.clock()
        give_up = now + self.config.request_timeout
        payload = json.dumps(
            {
                "id": request_id,
                # The connector starts no submit after this (a late one could send twice).
                "deadline": give_up - self.config.response_timeout - MARGIN,
                "items": [handoff.Item.of(m).__dict__ for m in messages],
            }
        )
        keys = [handoff.queue_key(carrier), handoff.GENERATION]
        args = [payload, f"{now:.6f}:{request_id}"]
        generation = cast(bytes, self._push_script(keys=keys, args=args))
        return request_id, payload, give_up, generation

    def _wait(
        self, carrier: str, request_id: str, payload: str, give_up: float, generation: bytes
    ) -> list[SendResult]:
        items = json.loads(payload)["items"]
        got = None
        while got is None and self.clock() < give_up:
            # In slices: a blocking read longer than the client's socket timeout would fail.
            wait = min(BLOCK_SLICE, max(0.1, give_up - self.clock()))
            try:
                got = self.redis.blpop([handoff.reply_key(request_id)], timeout=wait)
            except redis.TimeoutError:
                # The client's socket timeout is shorter than the slice: read again. (A
                # reply Redis gave the read just as it was cut off is lost with it; the
                # ledger below still has its outcome.)
                continue
        if got is not None:
            return [handoff.result_of(a) for a in json.loads(got[1])["answers"]]
        if self.redis.lrem(handoff.queue_key(carrier), 1, payload):
            # Nobody took it: nothing was sent, trying again later is safe.
            logger.warning("smpp: no connector took a request for carrier %s", carrier)
            return [
                SendResult(
                    Outcome.TRANSIENT,
                    error_code="connector_timeout",
                    error_text="no connector answered in time",
                    retry_after=5.0,
                )
                for _ in items
            ]
        # Taken but never answered (the connector died): the ledger says what it knows.
        # Or Redis lost its data (the request with it): a connector may have taken and
        # submitted it first, and a message it has no entry for is not known unsent.
        lost = self.redis.get(handoff.GENERATION) != generation
        return [self._from_ledger(item["key"], lost=lost) for item in items]

    def _from_ledger(self, key: str, *, lost: bool) -> SendResult:
        raw = self.redis.get(handoff.ledger_key(key))
        if raw is None and lost:
            return handoff.unknown(handoff.LOST_TEXT)
        found, ref = self._read_ledger(raw)
        if found is Lookup.ACCEPTED:
            return SendResult(Outcome.ACCEPTED, provider_message_id=ref)
        if found is Lookup.NOT_FOUND:
            return SendResult(
                Outcome.TRANSIENT, error_code="connector_lost", error_text="connector lost"
            )
        return handoff.unknown()

    @staticmethod
    def _read_ledger(raw: Any) -> tuple[Lookup, str | None]:
        value = raw.decode() if isinstance(raw, bytes) else raw
        if value is None or value == handoff.NOT_SENT:
            return Lookup.NOT_FOUND, None
        if value.startswith("a:"):
            return Lookup.ACCEPTED, value[2:]
        return Lookup.UNKNOWN, None

    def lookup(
        self, message: OutboundMessage, *, claimed_at: datetime | None = None
    ) -> tuple[Lookup, str | None]:
        """The ledger's word; no entry is "never submitted" only if Redis has kept its data
        since ``claimed_at``: else a connector may have submitted it before the loss."""
        raw = self.redis.get(handoff.ledger_key(message.idempotency_key))
        if raw is None and claimed_at is not None and self._lost_since(claimed_at):
            return Lookup.UNKNOWN, None
        return self._read_ledger(raw)

    def _lost_since(self, at: datetime) -> bool:
        """Whether the hand-off's data is younger than ``at`` (or gone): Redis lost it since."""
        raw: Any = self.redis.get(handoff.GENERATION)
        if raw is None:
            return True
        born, _, _ = (raw.decode() if isinstance(raw, bytes) else str(raw)).partition(":")
        try:
            return float(born) >= at.replace(tzinfo=at.tzinfo or UTC).timestamp()
        except ValueError:
            return True  # not a generation this code made: take the safe side

    def due_receipts(self, *, limit: int = 10) -> list[Receipt]:
        """Claim up to ``limit`` groups of the receipts the connector read (for a worker).

        They stay in Redis under this worker's claim until ``receipts_applied`` (after
        the commit) or ``requeue_receipts``; a claim left by a killed worker is given
        back to the head of the list once it is older than any task can run.
        """
        claim = handoff.claim_key(uuid.uuid4().hex)
        now = self.clock()
        groups = cast(
            list[bytes],
            self._claim_script(
                keys=[handoff.RECEIPTS, handoff.RECEIPT_CLAIMS, claim],
                args=[now, now - CLAIM_STALE_S, limit],
            ),
        )
        self._claim = claim if groups else None
        return [r for group in groups for r in handoff.receipts_of(group)]

    def receipts_applied(self) -> None:
        """The claimed receipts are committed: forget the claim."""
        if self._claim is not None:
            with self.redis.pipeline() as pipe:
                pipe.delete(self._claim)
                pipe.zrem(handoff.RECEIPT_CLAIMS, self._claim)
                pipe.execute()
            self._claim = None

    def requeue_receipts(self, receipts: Sequence[Receipt]) -> None:
        """Put back receipts a worker could not apply, ahead of the rest."""
        if receipts:
            self.redis.lpush(handoff.RECEIPTS, handoff.receipts_json(list(receipts)))
        self.receipts_applied()
