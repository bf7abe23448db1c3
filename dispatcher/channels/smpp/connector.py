"""The SMPP connector: a long-lived process that holds the binds.

One asyncio loop keeps every configured connection bound (transceiver, or a
transmitter and a receiver), reconnecting with backoff. It takes hand-off
requests from Redis (``handoff.py``), submits them windowed (several
``submit_sm`` outstanding per bind, throughput per connection from the global
limiter) and answers with each ``submit_sm_resp``. It reads ``deliver_sm``
continuously, whether or not anything is being sent: receipts go to the
receipts service, other messages (MO) to the inbound service, through a
:class:`Sink`. Design and measurements: docs/smpp.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import itertools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol, TypeVar

import redis
import redis.asyncio as aioredis
import smpp34

from dispatcher import metrics
from dispatcher.channels.base import Outcome, Receipt, SendResult
from dispatcher.channels.errors import REF_WIDTH, TEXT_WIDTH
from dispatcher.channels.smpp import aio, errors, handoff, pdu
from dispatcher.channels.smpp.aio import run_until
from dispatcher.channels.smpp.config import Carrier, Connection, SmppConfig
from dispatcher.db import utcnow
from dispatcher.ratelimit import Limit, RateLimiter

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Receipts go to the workers this often: a Redis list and a wake-up of the receipts
# task (receipts/wake.py), cheap, and every 0.1 s a delivered callback's latency.
RECEIPTS_EVERY = 0.1
# Inbound messages at most this often: each group is a database transaction in this
# process (applying receipts here five times a second once cost it a factor of three).
FLUSH_EVERY = 1.0
FLUSH_SIZE = 500
MO_PARTS_TTL = 3600
# Parts of long messages whose message id this process keeps in memory (the oldest go
# first): the rest are looked up in Redis, which keeps them LEDGER_TTL. A part leaves the
# map at its final receipt; this bounds those whose receipt never comes.
PARTS_KEPT = 100_000
# KEYS: a request's reply key, then its messages' ledger keys. ARGV: the ledger TTL, the
# reply ("" for none yet), then one ledger value per message. One command per request
# instead of a SET each.
LEDGER_SCRIPT = """
local ttl = tonumber(ARGV[1])
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', ttl)
end
if ARGV[2] ~= '' then
  redis.call('RPUSH', KEYS[1], ARGV[2])
  redis.call('EXPIRE', KEYS[1], 120)
end
"""
# A part's delivery. KEYS: its message's parts left, then its parts delivered (a set made
# with the member "" when the message was submitted). ARGV: the part's id. Returns the
# parts left, counting each part once: an SMSC sends a deliver_sm again when its
# deliver_sm_resp was lost or late, and a flush asks again when Redis's reply was lost.
# -1 when the set is missing (submitted before parts were counted so, or Redis lost it):
# the count may hold a part twice, so that message is not reported delivered here.
PART_DELIVERED = """
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then return redis.call('DECR', KEYS[1]) end
return tonumber(redis.call('GET', KEYS[1]) or -1)
"""


@dataclass(frozen=True)
class Inbound:
    """A mobile-originated message, reassembled and decoded."""

    carrier: str
    connection: str
    sender: str
    to: str
    body: str
    received_at: datetime
    data_coding: int


class Sink(Protocol):
    """Where the connector's receipts and inbound messages go (the database, in production)."""

    def receipts(self, receipts: Sequence[Receipt]) -> None:
        """Apply receipts, or keep them durably until their messages' outcomes are recorded."""

    def inbound(self, messages: Sequence[Inbound]) -> None:
        """Store inbound messages and their webhooks."""


@dataclass
class Stats:
    binds_up: int = 0
    bind_failures: int = 0
    submits: int = 0
    throttled: int = 0
    unknown: int = 0
    in_flight: int = 0
    window_peak: int = 0
    # Outstanding submits summed as each submit_sm goes out: / submits is the mean window use.
    outstanding_sum: int = 0
    receipts: int = 0
    inbound: int = 0

    def as_mapping(self) -> Any:
        """For HSET (typed loosely: redis-py's mapping type is invariant in its keys)."""
        return {k: int(v) for k, v in vars(self).items()}


def _utc() -> datetime:
    return utcnow()


def receipt_from(event: Any) -> Receipt | None:
    """A receipt from a deliver_sm: TLVs first, the text's fields otherwise."""
    tlvs = {t.tag: t for t in event.tlvs}
    text = pdu.decode_text(event.short_message, event.data_coding, alphabet="ascii")
    fields = pdu.parse_receipt_text(text)
    ref_tlv = tlvs.get(pdu.TLV_RECEIPTED_MESSAGE_ID)
    state_tlv = tlvs.get(pdu.TLV_MESSAGE_STATE)
    ref = (ref_tlv.as_string() or "").rstrip("\x00") if ref_tlv else fields.get("id", "")
    stat = fields.get("stat", "").upper()
    if state_tlv is not None and state_tlv.as_int() in pdu.MESSAGE_STATES:
        stat = pdu.MESSAGE_STATES[int(state_tlv.as_int() or 0)]
    status = pdu.STAT_STATUS.get(stat)
    if not ref or status is None:
        return None
    err = fields.get("err") or None
    failed = status in ("failed", "expired")
    # Cut to their columns, as every receipt source does: a text field this parser does
    # not know is read as part of the one before it, and a value too long for its column
    # would fail (PostgreSQL) the worker's whole group, put back ahead of the rest.
    return Receipt(
        provider_message_id=ref[:REF_WIDTH],
        status=status,
        error_code=(f"smpp_{stat.lower()}" if failed else None),
        error_text=(
            f"{stat} err:{err}"[:TEXT_WIDTH] if failed and err else stat if failed else None
        ),
        done_at=pdu.parse_receipt_date(fields.get("done date")),
        carrier_status=stat if err is None else f"{stat}:{err}",
    )


def encode_item(item: handoff.Item, carrier: Carrier, reference: int) -> pdu.Encoded:
    """The payloads of one message: text in the carrier's coding, or binary with its UDH;
    class 0 when it asks for flash and its coding has a class-0 form."""
    opts = item.options
    if opts.udh is not None:
        encoded = pdu.encode_binary(base64.b64decode(item.body), udh=bytes.fromhex(opts.udh))
    else:
        encoded = pdu.encode_body(
            item.body,
            reference=reference,
            alphabet=carrier.alphabet,
            data_coding=carrier.data_coding,
        )
    # 0x10 says GSM-7: a data_coding 0 that means Latin-1 or ASCII here cannot become it.
    if opts.flash and (encoded.data_coding != pdu.DC_DEFAULT or carrier.alphabet == "gsm7"):
        encoded = pdu.flash(encoded)
    return encoded


def source_of(item: handoff.Item, carrier: Carrier) -> pdu.Address:
    """The source address by the carrier's rules; a batch's from_ton / from_npi win."""
    found = pdu.source_address(
        item.sender, rules=carrier.source_rules, short_code_max=carrier.short_code_max
    )
    opts = item.options
    return pdu.Address(
        found.addr,
        found.ton if opts.source_ton is None else opts.source_ton,
        found.npi if opts.source_npi is None else opts.source_npi,
    )


def _not_sent(text: str, retry_after: float) -> SendResult:
    return SendResult(
        Outcome.TRANSIENT, error_code="not_sent", error_text=text, retry_after=retry_after
    )


def _source_number(addr: str, ton: int) -> str:
    if ton == 1 or (addr.isdigit() and len(addr) > 8):
        return "+" + addr.lstrip("+")
    return addr


class Link:
    """One connection: its binds, its window and its pause after throttling."""

    def __init__(self, conn: Connection, carrier: Carrier, owner: Connector) -> None:
        self.conn = conn
        self.carrier = carrier
        self.owner = owner
        self.tx: Any = None
        self.clients: dict[str, Any] = {}
        self.window = asyncio.Semaphore(conn.window)
        self.paused_until = 0.0
        self.pause = owner.config.throttle_pause
        self.stats = Stats()
        self.reference = itertools.count(1)
        self._sources: dict[tuple[str, int | None, int | None], pdu.Address] = {}

    @property
    def kinds(self) -> list[str]:
        return ["TRX"] if self.conn.bind == "transceiver" else ["TX", "RX"]

    async def keep_bound(self, kind: str) -> None:
        """Bind, read until the session ends, bind again with backoff; until stopped."""
        delay = self.owner.config.reconnect_min
        while not self.owner.stopping.is_set():
            client = smpp34.Client(
                host=self.conn.host,
                port=self.conn.port,
                system_id=self.conn.system_id,
                password=self.conn.password,
                bind_type=kind,
                system_type=self.conn.system_type,
                tls=self.conn.tls,
                window_size=self.conn.window,
                connect_timeout_ms=5000,
            )
            try:
                smsc = await asyncio.wait_for(client.connect(), 10)
            except (smpp34.SmppError, OSError, TimeoutError) as exc:
                self.stats.bind_failures += 1
                metrics.carrier_connection(provider="smpp", connection=self.conn.name, up=False)
                logger.warning(
                    "smpp %s: %s bind to %s:%s failed (%s); next try in %.1fs",
                    self.conn.name,
                    kind,
                    self.conn.host,
                    self.conn.port,
                    type(exc).__name__ if not isinstance(exc, smpp34.SmppError) else exc,
                    delay,
                )
                await self.owner.sleep_or_stop(delay)
                delay = min(delay * 2, self.owner.config.reconnect_max)
                continue
            delay = self.owner.config.reconnect_min
            logger.info(
                "smpp %s: %s bound to %s:%s", self.conn.name, kind, self.conn.host, self.conn.port
            )
            self.clients[kind] = client
            self.stats.binds_up += 1
            metrics.carrier_connection(provider="smpp", connection=self.conn.name, up=True)
            if kind in ("TRX", "TX"):
                self.tx = smsc
                await self.owner.mark_alive(self)
            try:
                await self.read(smsc)
            finally:
                self.stats.binds_up -= 1
                metrics.carrier_connection(provider="smpp", connection=self.conn.name, up=False)
                self.clients.pop(kind, None)
                if kind in ("TRX", "TX"):
                    self.tx = None
                    await self.owner.mark_down(self)
                logger.warning("smpp %s: %s bind lost", self.conn.name, kind)
                with contextlib.suppress(Exception):
                    await client.stop()

    async def read(self, smsc: Any) -> None:
        """Take every deliver_sm until the session ends; unbind when the connector stops."""

        async def pump() -> None:
            while not isinstance(event := await smsc.next(), smpp34.Disconnected):
                if not self.owner.on_receipt(self, event):
                    # Shielded: a stop never cuts an MO's parts off half-stored.
                    await asyncio.shield(self.owner.on_mo(self, event))

        if await run_until(pump(), self.owner.stopping):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(smsc.unbind(), 2)

    async def wait_ready(self, deadline: float) -> bool:
        """Wait out a throttling pause; False if it lasts past ``deadline`` or the bind is gone."""
        while True:
            if self.tx is None:
                return False
            wait = self.paused_until - time.monotonic()
            if wait <= 0:
                return True
            if time.time() + wait > deadline:
                return False
            await asyncio.sleep(wait)

    def throttled(self) -> float:
        """Slow down: pause this connection, longer each time in a row."""
        self.stats.throttled += 1
        pause = self.pause
        self.paused_until = max(self.paused_until, time.monotonic() + pause)
        self.pause = min(pause * 2, 30.0)
        return pause

    async def submit_all(self, items: list[handoff.Item], deadline: float) -> list[SendResult]:
        """Submit ``items`` windowed, in order; their results in the same order.

        At most a window's worth of coroutines take the items in turn: not a task per
        message, which cost more than the submit itself.
        """
        results: list[SendResult | None] = [None] * len(items)
        todo = iter(enumerate(items))

        async def runner() -> None:
            for i, item in todo:
                results[i] = await self.submit_item(item, deadline)

        await asyncio.gather(*(runner() for _ in range(min(self.conn.window, len(items)))))
        return [r if r is not None else handoff.unknown() for r in results]

    def source(self, item: handoff.Item) -> pdu.Address:
        opts = item.options
        key = (item.sender, opts.source_ton, opts.source_npi)
        found = self._sources.get(key)
        if found is None:
            if len(self._sources) > 4096:
                self._sources.clear()
            found = self._sources[key] = source_of(item, self.carrier)
        return found

    async def submit_item(self, item: handoff.Item, deadline: float) -> SendResult:
        """Submit every part of one message; the first part's message_id is the provider id."""
        sender = self.source(item)
        dest = pdu.destination_address(item.to)
        encoded = encode_item(item, self.carrier, next(self.reference) & 0xFF)
        expire = datetime.fromisoformat(item.expire_at) if item.expire_at else None
        validity = pdu.validity_period(expire, now=_utc())
        ids: list[str] = []
        for payload in encoded.payloads:
            async with self.window:
                if not await self.wait_ready(deadline) or time.time() > deadline:
                    return (
                        self._partial(ids)
                        if ids
                        else _not_sent("connection busy or down", self.pause)
                    )
                await self.owner.take_token(self)
                smsc = self.tx
                if smsc is None:
                    return self._partial(ids) if ids else _not_sent("bind lost", 1.0)
                token = self.owner.submit_started()
                try:
                    self.stats.in_flight += 1
                    self.stats.window_peak = max(self.stats.window_peak, self.stats.in_flight)
                    self.stats.outstanding_sum += self.stats.in_flight
                    try:
                        # asyncio.timeout, not wait_for: no task per submit.
                        async with asyncio.timeout(self.owner.config.response_timeout):
                            resp = await smsc.submit_sm(
                                dest.addr,
                                payload,
                                source_addr=sender.addr,
                                source_addr_ton=sender.ton,
                                source_addr_npi=sender.npi,
                                dest_addr_ton=dest.ton,
                                dest_addr_npi=dest.npi,
                                esm_class=encoded.esm_class,
                                registered_delivery=1 if self.carrier.registered_delivery else 0,
                                validity_period=validity,
                                data_coding=encoded.data_coding,
                            )
                    except (smpp34.SmppError, TimeoutError, OSError) as exc:
                        # No submit_sm_resp: the SMSC may or may not have it. Never resend.
                        if not isinstance(exc, TimeoutError) and self.tx is smsc:
                            # The session is gone: no further submit may start on it.
                            self.tx = None
                        self.stats.unknown += 1
                        return handoff.unknown()
                    finally:
                        self.stats.in_flight -= 1
                    self.stats.submits += 1
                    if resp.command_status == errors.ESME_ROK and len(encoded.payloads) > 1:
                        # Known as a part before any receipt for it is looked at (see flush).
                        message_id = resp.message_id or ""
                        main = ids[0] if ids else message_id
                        await self.owner.remember_part(message_id, main, len(encoded.payloads))
                finally:
                    # Answered or given up, and its parts noted or not: the receipts
                    # that came after it must not wait for it (see flush).
                    self.owner.submit_done(token)
                status = resp.command_status
                if status != errors.ESME_ROK:
                    if ids:
                        return self._partial(ids)
                    return SendResult(
                        errors.classify(status),
                        error_code=errors.name(status),
                        error_text=f"submit_sm_resp {errors.name(status)}",
                        retry_after=self.throttled() if status in errors.THROTTLING else None,
                    )
                self.pause = self.owner.config.throttle_pause
                ids.append(resp.message_id or "")
        return SendResult(Outcome.ACCEPTED, provider_message_id=ids[0])

    def _partial(self, ids: list[str]) -> SendResult:
        # Some parts went out: sending again would repeat them on the handset.
        return SendResult(
            Outcome.RECIPIENT,
            error_code="partial_submit",
            error_text=f"{len(ids)} part(s) accepted, then the rest failed; not re-sent",
        )


def _log_failed(name: str, task: asyncio.Future[None]) -> None:
    """Log a hand-off request that raised, when it does: the worker that sent it waits
    for its answer until its deadline, and nothing else would retrieve the error."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.error("smpp %s: a hand-off request failed", name, exc_info=exc)


class Connector:
    def __init__(
        self,
        *,
        config: SmppConfig,
        redis_url: str,
        sink: Sink,
        limiter: RateLimiter | None = None,
        carriers: Sequence[str] | None = None,
        max_requests: int = 8,
    ) -> None:
        self.config = config
        self.redis_url = redis_url
        self.sink = sink
        self.limiter = limiter
        names = carriers or list(config.carriers)
        self.links: list[Link] = []
        self.stopping = asyncio.Event()
        for name in names:
            carrier = config.carriers[name]
            for conn in carrier.connections:
                self.links.append(Link(conn, carrier, self))
        self.max_requests = max_requests
        self.part_of: OrderedDict[str, str] = OrderedDict()
        self._inflight: dict[int, float] = {}
        self._tokens = itertools.count()
        self._receipts: list[tuple[float, Receipt]] = []
        # Receipts translated (parts folded) and waiting for the sink.
        self._outgoing: list[Receipt] = []
        self._inbound: list[Inbound] = []
        self._inbound_flushed = time.monotonic()
        self._wake = asyncio.Event()
        self.redis: aioredis.Redis = aioredis.Redis.from_url(redis_url)
        self._ledger = self.redis.register_script(LEDGER_SCRIPT)
        self._part_delivered = self.redis.register_script(PART_DELIVERED)
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        """Hold the binds and serve requests until :meth:`stop`."""
        self._loop = asyncio.get_running_loop()
        tasks = [
            asyncio.create_task(link.keep_bound(kind), name=f"{link.conn.name} {kind} bind")
            for link in self.links
            for kind in link.kinds
        ]
        tasks += [
            asyncio.create_task(self.serve(link), name=f"{link.conn.name} requests")
            for link in self.links
        ]
        tasks.append(asyncio.create_task(self.flush_loop(), name="receipt flush"))
        tasks.append(asyncio.create_task(self.heartbeat(), name="heartbeat"))
        stopped = asyncio.create_task(self.stopping.wait())
        failed: asyncio.Task[Any] | None = None
        try:
            # Every loop runs until the connector stops. One that ends before (a defect)
            # ends the connector: alone, its heartbeat would still report the binds live
            # while nothing read the workers' requests, say.
            done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
            # (A loop may see the stop before the waiter does: that is no failure.)
            if not self.stopping.is_set():
                failed = next((t for t in done if t is not stopped), None)
            if failed is not None:
                logger.critical(
                    "smpp: the %s loop ended while the connector ran; stopping the connector",
                    failed.get_name(),
                    exc_info=failed.exception(),
                )
        finally:
            self.stopping.set()
            stopped.cancel()
            await asyncio.wait(tasks, timeout=self.config.response_timeout + 5)
            for t in tasks:
                t.cancel()
            await self.flush(final=True)
            for link in self.links:
                await self.mark_down(link)
            await self.redis.aclose()
        if failed is not None:
            failed.result()  # its error, as the connector's
            raise RuntimeError("an SMPP connector loop ended while the connector ran")

    def stop(self) -> None:
        """Stop serving (from any thread): finish what is in flight, unbind, exit run()."""
        loop = self._loop
        if loop is not None and loop.is_running():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not loop:
                loop.call_soon_threadsafe(self.stop)
                return
        self.stopping.set()
        self._wake.set()

    async def sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def mark_alive(self, link: Link) -> None:
        await self.redis.set(handoff.alive_key(link.conn.name), "1", ex=handoff.ALIVE_TTL)

    async def mark_down(self, link: Link) -> None:
        with contextlib.suppress(redis.RedisError):
            await self.redis.delete(handoff.alive_key(link.conn.name))

    async def heartbeat(self) -> None:
        while not self.stopping.is_set():
            pipe = self.redis.pipeline(transaction=False)
            for link in self.links:
                if link.tx is not None:
                    pipe.set(handoff.alive_key(link.conn.name), "1", ex=handoff.ALIVE_TTL)
                pipe.hset(handoff.stats_key(link.conn.name), mapping=link.stats.as_mapping())
            with contextlib.suppress(redis.RedisError):
                await pipe.execute()
            await self.sleep_or_stop(1.0)

    # -- sending ---------------------------------------------------------------

    async def serve(self, link: Link) -> None:
        """Take requests for the link's carrier while its transmitter is bound."""
        running: set[asyncio.Future[None]] = set()
        key = handoff.queue_key(link.conn.carrier)
        while not self.stopping.is_set():
            if link.tx is None or len(running) >= self.max_requests:
                await asyncio.sleep(0.05)
                continue
            try:
                got = await self.redis.blpop([key], timeout=1)
            except redis.RedisError as exc:
                logger.warning("smpp %s: redis: %s", link.conn.name, exc)
                await self.sleep_or_stop(1.0)
                continue
            if got is None:
                continue
            if link.tx is None:
                # The bind was lost while this read waited: the request goes back to the
                # head of the queue for a bound connection (answered here, it would come
                # back to its worker as not sent, to be tried again seconds later).
                await self._give_back(key, got[1])
                continue
            task = asyncio.ensure_future(self.handle(link, got[1]))
            running.add(task)
            task.add_done_callback(running.discard)
            task.add_done_callback(functools.partial(_log_failed, link.conn.name))
        if running:
            await asyncio.wait(running)

    async def _give_back(self, key: str, raw: bytes | str) -> None:
        """Put a request nothing was done for back at the head of its queue."""
        try:
            await self.redis.lpush(key, raw)
        except redis.RedisError as exc:
            # Its worker finds no answer and no ledger entry: not sent, tried again later.
            logger.warning("smpp: redis: %s; a request could not be given back", exc)

    async def handle(self, link: Link, raw: bytes | str) -> None:
        request = json.loads(raw)
        items = [handoff.Item(**i) for i in request["items"]]
        deadline = float(request["deadline"])
        keys = [handoff.reply_key(request["id"]), *(handoff.ledger_key(i.key) for i in items)]
        await self._ledger(keys, [handoff.LEDGER_TTL, "", *[handoff.PENDING] * len(items)])
        answers = await link.submit_all(items, deadline)
        reply = json.dumps({"answers": [handoff.result_json(a) for a in answers]})
        await self._ledger(
            keys, [handoff.LEDGER_TTL, reply, *(handoff.ledger_value(a) for a in answers)]
        )

    async def take_token(self, link: Link) -> None:
        if self.limiter is None or not link.conn.throughput:
            return
        # One key per connection, shared by every connector process and host.
        limit = Limit(f"smpp:{link.conn.name}", link.conn.throughput)
        delay = await asyncio.to_thread(self.limiter.reserve, [limit], 1)
        if delay > 0:
            await asyncio.sleep(delay)

    def submit_started(self) -> int:
        token = next(self._tokens)
        self._inflight[token] = time.monotonic()
        return token

    def submit_done(self, token: int) -> None:
        self._inflight.pop(token, None)

    async def remember_part(self, part: str, main: str, total: int) -> None:
        """Map a part's id to its message's (the first part's), for receipts that come per part."""
        self.part_of[part] = main
        while len(self.part_of) > PARTS_KEPT:
            self.part_of.popitem(last=False)
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(handoff.part_key(part), main, ex=handoff.LEDGER_TTL)
        if part == main:
            pipe.set(handoff.left_key(main), total, ex=handoff.LEDGER_TTL)
            # "" is no part's id: the set says the parts are counted once each (translate).
            pipe.sadd(handoff.done_key(main), "")
            pipe.expire(handoff.done_key(main), handoff.LEDGER_TTL)
        await pipe.execute()

    # -- receiving -------------------------------------------------------------

    def on_receipt(self, link: Link, event: Any) -> bool:
        """Buffer a deliver_sm that is a receipt; False if it is not one (an MO)."""
        if event.esm_class & pdu.ESM_TYPE_MASK not in (0x04, 0x20):
            return False
        receipt = receipt_from(event)
        if receipt is None:
            logger.warning("smpp %s: unreadable receipt ignored", link.conn.name)
            return True
        link.stats.receipts += 1
        self._receipts.append((time.monotonic(), receipt))
        self._flush_if_full()
        return True

    async def on_mo(self, link: Link, event: Any) -> None:
        message = await self.reassemble(link, event)
        if message is None:
            return
        link.stats.inbound += 1
        self._inbound.append(message)
        self._flush_if_full()

    def _flush_if_full(self) -> None:
        if len(self._receipts) + len(self._inbound) >= FLUSH_SIZE:
            self._wake.set()

    async def reassemble(self, link: Link, event: Any) -> Inbound | None:
        """An MO's text; parts of a concatenated one wait in Redis until all have come."""
        body = event.short_message
        if not body:
            for t in event.tlvs:
                if t.tag == pdu.TLV_MESSAGE_PAYLOAD:
                    body = t.value
        concat, payload = pdu.split_udh(body, event.esm_class)
        text = pdu.decode_text(payload, event.data_coding, alphabet=link.carrier.alphabet)
        sender = _source_number(event.source_addr, event.source_addr_ton)
        to = _source_number(event.destination_addr, event.dest_addr_ton)
        if concat is not None and concat.total > 1:
            key = handoff.key("mo", f"{link.conn.carrier}:{sender}:{to}:{concat.reference}")
            pipe = self.redis.pipeline()
            pipe.hset(key, str(concat.number), text)
            pipe.expire(key, MO_PARTS_TTL)
            pipe.hgetall(key)
            got = (await pipe.execute())[-1]
            if len(got) < concat.total:
                return None
            await self.redis.delete(key)
            parts = {int(k): v.decode() for k, v in got.items()}
            text = "".join(parts[n] for n in sorted(parts))
        return Inbound(
            carrier=link.conn.carrier,
            connection=link.conn.name,
            sender=sender,
            to=to,
            body=text,
            received_at=_utc(),
            data_coding=event.data_coding,
        )

    async def flush_loop(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RECEIPTS_EVERY)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:
                # The database may be down for a moment: everything stays buffered.
                logger.exception("smpp: storing receipts or inbound messages failed; will retry")
                await self.sleep_or_stop(1.0)

    async def flush(self, *, final: bool = False) -> None:
        """Hand buffered receipts to the sink, and inbound messages every FLUSH_EVERY.

        Receipts first: they need Redis alone, and the carrier has had its answer, so
        this buffer is their only copy (a database down must not hold them here).
        """
        # A receipt is translated only once every submit that began before it arrived
        # has its submit_sm_resp: only then is a part's id known to be a part's.
        oldest = min(self._inflight.values(), default=None)
        ready: list[tuple[float, Receipt]] = []
        keep: list[tuple[float, Receipt]] = []
        for at, r in self._receipts:
            if final or oldest is None or at < oldest:
                ready.append((at, r))
            else:
                keep.append((at, r))
        self._receipts = keep
        done = 0
        try:
            mains = await self.parts_of([r.provider_message_id for _, r in ready])
            for (_, r), main in zip(ready, mains, strict=True):
                translated = await self.translate(r, main)
                done += 1
                if r.status != "enroute":
                    # Its final receipt: one sent again is looked up in Redis.
                    self.part_of.pop(r.provider_message_id, None)
                if translated is not None:
                    self._outgoing.append(translated)
        finally:
            # Redis failed part way: the rest wait for the next flush, ahead of newer ones.
            self._receipts[:0] = ready[done:]
        await _drain(self._outgoing, self.sink.receipts)
        now = time.monotonic()
        if final or len(self._inbound) >= FLUSH_SIZE or now - self._inbound_flushed >= FLUSH_EVERY:
            self._inbound_flushed = now
            await _drain(self._inbound, self.sink.inbound)

    async def parts_of(self, refs: list[str]) -> list[str | None]:
        """For each id, the id of the message it is a part of (None: not a part)."""
        known = [self.part_of.get(ref) for ref in refs]
        unknown = [ref for ref, main in zip(refs, known, strict=True) if main is None]
        if not unknown:
            return known
        raw = await self.redis.mget([handoff.part_key(r) for r in unknown])
        found = {
            ref: value.decode() if isinstance(value, bytes) else value
            for ref, value in zip(unknown, raw, strict=True)
        }
        return [main or found.get(ref) for ref, main in zip(refs, known, strict=True)]

    async def translate(self, receipt: Receipt, main: str | None) -> Receipt | None:
        """A part's receipt as its message's: failure at once, delivery once every part is."""
        if receipt.status == "enroute":
            return None
        if main is None:
            return receipt
        if receipt.status == "delivered":
            keys = [handoff.left_key(main), handoff.done_key(main)]
            left = await self._part_delivered(
                keys, [receipt.provider_message_id], client=self.redis
            )
            if left != 0:
                return None
        return replace(receipt, provider_message_id=main)


async def _drain(buffer: list[T], deliver: Callable[[list[T]], None]) -> None:
    """Hand what ``buffer`` holds to ``deliver`` (in a thread: it writes the database);
    if that fails, put it back ahead of what arrived meanwhile."""
    if not buffer:
        return
    batch = list(buffer)
    buffer.clear()
    try:
        await asyncio.to_thread(deliver, batch)
    except Exception:
        buffer[:0] = batch
        raise


def run_forever(connector: Connector, *, install_signals: bool = True) -> None:
    """Run the connector until SIGTERM or SIGINT (the ``dispatcher smpp-connector`` process)."""
    import signal

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, connector.stop)
        await connector.run()

    aio.run(main())


__all__ = ["Connector", "Inbound", "Sink", "receipt_from", "run_forever"]
