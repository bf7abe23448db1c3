"""The connector and provider against smpp34's SMSC on 127.0.0.1, scripted per test.

The connector runs on its own event loop (a thread here; its own process in
test_system.py); the provider talks to it through the real Redis, as a send
worker does.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest
import redis
import redis.asyncio as aioredis
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.channels.base import Lookup, OutboundMessage, Outcome, Receipt, SmsOptions
from dispatcher.channels.smpp import connector as connector_module
from dispatcher.channels.smpp import errors, pdu
from dispatcher.channels.smpp.connector import FLUSH_EVERY, RECEIPTS_EVERY, Connector, Inbound
from dispatcher.channels.smpp.handoff import (
    LEDGER_TTL,
    RECEIPT_CLAIMS,
    done_key,
    ledger_key,
    left_key,
    queue_key,
    reply_key,
    stats_key,
)
from dispatcher.channels.smpp.provider import CLAIM_STALE_S, SmppProvider
from dispatcher.channels.smpp.sink import DatabaseSink
from dispatcher.channels.smpp.smsc import Action, LocalSmsc, Submit, running
from dispatcher.sms import parts
from tests.channels.smpp.conftest import (
    PASSWORD,
    RecordingSink,
    Sink,
    connector_running,
    live_provider,
    smpp_config,
    wait_live,
)
from tests.helpers import free_port, wait_for


def message(i: int, body: str = "hello", *, to: str | None = None) -> OutboundMessage:
    return OutboundMessage(
        recipient_id=f"rcp-{i}",
        channel="sms",
        to=to or f"+4477009{i:05d}",
        sender="Dispatcher",
        body=body,
    )


def test_text_arrives_byte_exact_in_gsm7_and_ucs2(
    port: int, redis_url: str, smpp_redis: redis.Redis
) -> None:
    config = smpp_config({"local": [port]})
    record = RecordingSink()
    bodies = {
        "gsm": "Price: 5€ {ok} [x] ~^|\\ @£$¥",
        "ucs2": "Привет, €5 {ok} 😀",
        "emoji": "😀👍🏽",
    }
    with running(LocalSmsc(port=port)) as smsc, connector_running(config, redis_url, record):
        provider = live_provider(smpp_redis, config)
        messages = [message(i, body) for i, body in enumerate(bodies.values())]
        results = provider.send_many(messages)
        assert [r.outcome for r in results] == [Outcome.ACCEPTED] * 3
        by_dest = {s.destination_addr: s for s in smsc.submits}
    gsm, ucs2, emoji = (by_dest[m.to.lstrip("+")] for m in messages)
    assert gsm.data_coding == 0
    assert gsm.short_message == (
        b"Price: 5\x1b\x65 \x1b\x28ok\x1b\x29 \x1b\x3cx\x1b\x3e \x1b\x3d\x1b\x14\x1b\x40\x1b\x2f "
        b"\x00\x01\x02\x03"
    )
    assert ucs2.data_coding == 8
    assert ucs2.short_message == bodies["ucs2"].encode("utf-16-be")
    assert emoji.short_message == b"\xd8\x3d\xde\x00\xd8\x3d\xdc\x4d\xd8\x3c\xdf\xfd"
    for s in (gsm, ucs2, emoji):
        assert (s.source_addr, s.source_addr_ton, s.source_addr_npi) == ("Dispatcher", 5, 0)
        assert (s.dest_addr_ton, s.dest_addr_npi) == (1, 1)
        assert s.registered_delivery == 1
        assert s.system_id == "local"
    # The provider id is the SMSC's message_id.
    assert {r.provider_message_id for r in results} == set(smsc.accepted)


def test_binary_flash_and_source_ton_npi_reach_the_smsc_as_asked(
    port: int, redis_url: str, smpp_redis: redis.Redis
) -> None:
    udh = "0605040B8423F0"  # UDHL 6, port addressing (WAP push 2948 from 9200)
    data = bytes(range(0, 256, 2))[:120]
    b64 = base64.b64encode(data).decode()
    asked = [
        (b64, SmsOptions(udh=udh)),
        (b64, SmsOptions(udh=udh, flash=True)),
        ("Flash €", SmsOptions(flash=True)),
        ("Flash Привет", SmsOptions(flash=True)),
        ("Typed source", SmsOptions(source_ton=2, source_npi=9)),
    ]
    messages = [message(i, body)._replace(sms=opts) for i, (body, opts) in enumerate(asked)]
    config = smpp_config({"local": [port]})
    with (
        running(LocalSmsc(port=port)) as smsc,
        connector_running(config, redis_url, RecordingSink()),
    ):
        provider = live_provider(smpp_redis, config)
        results = provider.send_many(messages)
        assert [r.outcome for r in results] == [Outcome.ACCEPTED] * len(asked)
        by_dest = {s.destination_addr: s for s in smsc.submits}
    binary, flash_binary, gsm, ucs2, typed = (by_dest[m.to.lstrip("+")] for m in messages)
    # 8-bit data (4), UDHI set, the UDH as given ahead of the data, one part.
    assert (binary.data_coding, binary.esm_class) == (0x04, 0x40)
    assert binary.short_message == bytes.fromhex(udh) + data
    # Class 0 ("flash") keeps the alphabet: 8-bit 0x14, GSM-7 0x10, UCS-2 0x18.
    assert (flash_binary.data_coding, flash_binary.short_message) == (0x14, binary.short_message)
    assert (gsm.data_coding, gsm.esm_class, gsm.short_message) == (0x10, 0, b"Flash \x1b\x65")
    assert (ucs2.data_coding, ucs2.short_message) == (0x18, "Flash Привет".encode("utf-16-be"))
    # from_ton / from_npi win over the alphanumeric rule (5/0); the others keep it.
    assert (typed.source_addr, typed.source_addr_ton, typed.source_addr_npi) == (
        "Dispatcher",
        2,
        9,
    )
    assert (gsm.source_addr_ton, gsm.source_addr_npi) == (5, 0)
    assert len(smsc.submits) == len(asked)


def test_long_messages_reassemble_in_order_on_the_smsc(
    port: int, redis_url: str, smpp_redis: redis.Redis
) -> None:
    config = smpp_config({"local": [port]}, window=8)
    bodies = [
        "".join(f"{i:04d} GSM part text € " for i in range(40)),
        "".join(f"{i:03d} юникод 😀 " for i in range(30)),
        "x" * 161,
    ]
    record = RecordingSink()
    with running(LocalSmsc(port=port)) as smsc, connector_running(config, redis_url, record):
        provider = live_provider(smpp_redis, config)
        messages = [message(i, b) for i, b in enumerate(bodies)]
        results = provider.send_many(messages)
        assert all(r.outcome is Outcome.ACCEPTED for r in results)
        # One receipt per message, however many parts it had.
        wait_for(lambda: len(record.receipts) == 3)
        submits = list(smsc.submits)
    grouped: dict[str, list[tuple[pdu.Concat, str]]] = defaultdict(list)
    for s in submits:
        concat, text = s.text()
        assert concat is not None
        grouped[s.destination_addr].append((concat, text))
    for m, body in zip(messages, bodies, strict=True):
        got = grouped[m.to.lstrip("+")]
        assert len(got) == parts.analyse(body).parts
        assert {c.reference for c, _ in got} == {got[0][0].reference}
        assert sorted(c.number for c, _ in got) == list(range(1, len(got) + 1))
        assert "".join(t for _, t in sorted(got, key=lambda ct: ct[0].number)) == body
    assert {r.provider_message_id for r in record.receipts} == {
        r.provider_message_id for r in results
    }


def test_a_long_message_is_delivered_once_every_part_is_whatever_receipt_is_resent(
    port: int, redis_url: str, smpp_redis: redis.Redis
) -> None:
    """An SMSC sends a deliver_sm again when its deliver_sm_resp was lost or late (the ESME
    must take the duplicate): a part's receipt twice is one part delivered, not two."""
    config = smpp_config({"local": [port]})
    record = RecordingSink()
    # No receipt of its own accord: the test says which part's receipt goes, and when.
    smsc_ = LocalSmsc(port=port, script=lambda s: Action(receipt=None))
    with running(smsc_) as smsc, connector_running(config, redis_url, record) as connector:
        provider = live_provider(smpp_redis, config)
        long, marker = provider.send_many([message(1, "x" * 400), message(2)])
        assert long.outcome is marker.outcome is Outcome.ACCEPTED
        by_part = {
            cast(pdu.Concat, s.text()[0]).number: ref
            for ref, s in smsc.accepted.items()
            if s.destination_addr == message(1).to.lstrip("+")
        }
        first, second, third = (by_part[n] for n in (1, 2, 3))
        assert first == long.provider_message_id
        link = connector.links[0]

        def reported(ref: str | None) -> list[Receipt]:
            with record.lock:
                return [r for r in record.receipts if r.provider_message_id == ref]

        for ref in (first, first, second):
            smsc.post_receipt(ref)
        wait_for(lambda: link.stats.receipts == 3)
        # Receipts are handed over in the order they came: the marker's follows the parts'.
        smsc.post_receipt(marker.provider_message_id or "")
        wait_for(lambda: reported(marker.provider_message_id))
        assert reported(long.provider_message_id) == []
        smsc.post_receipt(third)
        got = wait_for(lambda: reported(long.provider_message_id))
        assert [r.status for r in got] == ["delivered"]


def test_a_long_messages_parts_not_counted_once_each_are_never_reported_delivered(
    port: int, redis_url: str, smpp_redis: redis.Redis
) -> None:
    """Where the parts delivered cannot be told apart, delivery is not reported (the message
    ends ``unknown`` at the receipt deadline): a count left by a connector that counted
    parts blindly (an upgrade), a count Redis lost while the connector knew the parts.
    A part's delivery asked again (a reply lost) is answered again."""
    connector = Connector(
        config=smpp_config({"local": [port]}), redis_url=redis_url, sink=Sink(RecordingSink())
    )

    def delivered(ref: str) -> Receipt:
        return Receipt(ref, "delivered", done_at=None)

    async def parts() -> None:
        # Submitted before the upgrade, three parts: the first counted as delivered then.
        smpp_redis.set(left_key("m1"), 2, ex=LEDGER_TTL)
        # ...and its receipt sent again after it, then the second's.
        assert await connector.translate(delivered("m1"), "m1") is None
        assert await connector.translate(delivered("m1-2"), "m1") is None
        # Redis lost the count: the connector still knows its parts (in memory).
        await connector.remember_part("m2", "m2", 2)
        await connector.remember_part("m2-2", "m2", 2)
        smpp_redis.delete(left_key("m2"), done_key("m2"))
        assert await connector.parts_of(["m2-2"]) == ["m2"]
        assert await connector.translate(delivered("m2"), "m2") is None
        # Counted afresh: the last part's delivery asked twice is reported twice (the
        # receipts service drops a repeated delivery; a lost one would be lost for good).
        await connector.remember_part("m3", "m3", 2)
        await connector.remember_part("m3-2", "m3", 2)
        assert await connector.translate(delivered("m3-2"), "m3") is None
        assert await connector.translate(delivered("m3-2"), "m3") is None
        for _ in range(2):
            got = await connector.translate(delivered("m3"), "m3")
            assert got == delivered("m3")
        assert smpp_redis.ttl(done_key("m3")) > LEDGER_TTL - 60
        await connector.redis.aclose()

    asyncio.run(parts())


@pytest.mark.parametrize("tlvs", [True, False], ids=["tlvs", "text-only"])
def test_every_receipt_is_applied_before_or_after_the_resp(
    tlvs: bool, port: int, redis_url: str, smpp_redis: redis.Redis
) -> None:
    stats = ["DELIVRD", "EXPIRED", "DELETED", "UNDELIV", "ACCEPTD", "UNKNOWN", "REJECTD"]

    def script(s: Submit) -> Action:
        i = int(s.destination_addr[-5:])
        return Action(receipt=stats[i % len(stats)], receipt_first=i % 2 == 0)

    config = smpp_config({"local": [port]})
    record = RecordingSink()
    with (
        running(LocalSmsc(port=port, script=script, receipt_tlvs=tlvs)),
        connector_running(config, redis_url, record),
    ):
        provider = live_provider(smpp_redis, config)
        results = provider.send_many([message(i) for i in range(14)])
        wait_for(lambda: len(record.receipts) == 14)
    by_id = {r.provider_message_id: r for r in record.receipts}
    for i, result in enumerate(results):
        receipt = by_id[result.provider_message_id or ""]
        stat = stats[i % len(stats)]
        assert receipt.status == pdu.STAT_STATUS[stat]
        assert (receipt.carrier_status or "").startswith(stat)
        assert receipt.done_at is not None
        if receipt.status != "delivered":
            assert receipt.error_code == f"smpp_{stat.lower()}"


def test_throttling_slows_the_connection_and_loses_nothing(
    port: int, redis_url: str, smpp_redis: redis.Redis
) -> None:
    throttled: set[str] = set()

    def script(s: Submit) -> Action:
        # Every third destination is throttled once, then accepted.
        if int(s.destination_addr[-5:]) % 3 == 0 and s.destination_addr not in throttled:
            throttled.add(s.destination_addr)
            return Action(status=errors.ESME_RTHROTTLED)
        return Action(receipt=None)

    config = smpp_config({"local": [port]}, window=4)
    record = RecordingSink()
    messages = [message(i) for i in range(12)]
    with running(LocalSmsc(port=port, script=script)) as smsc:
        with connector_running(config, redis_url, record):
            provider = live_provider(smpp_redis, config)
            started = time.monotonic()
            results = provider.send_many(messages)
            transient = [
                m for m, r in zip(messages, results, strict=True) if r.outcome is Outcome.TRANSIENT
            ]
            assert len(transient) == 4
            assert all(r.retry_after for r in results if r.outcome is Outcome.TRANSIENT)
            assert {r.error_code for r in results if r.outcome is Outcome.TRANSIENT} == {
                "ESME_RTHROTTLED"
            }
            # The worker tries those again later; this time they go through.
            again = provider.send_many(transient)
            assert all(r.outcome is Outcome.ACCEPTED for r in again)
            elapsed = time.monotonic() - started
            # The counters are written once a second: wait for a write after the throttling.
            throttled_count = wait_for(
                lambda: int(smpp_redis.hget(stats_key("local-0"), "throttled") or 0) or None
            )
        accepted = Counter(s.destination_addr for s in smsc.accepted.values())
    # Throttled submits paused the connection (0.3 s, doubling) instead of pressing on.
    assert elapsed >= 0.3
    assert throttled_count >= 1
    assert accepted == Counter(m.to.lstrip("+") for m in messages)


def test_a_connection_dropped_mid_window_sends_nothing_twice(
    port: int, redis_url: str, smpp_redis: redis.Redis
) -> None:
    def script(s: Submit) -> Action:
        # Two answered, two never answered, then the SMSC drops the session.
        if s.seq in (3, 4):
            return Action(hold=True)
        if s.seq == 5:
            return Action(drop=True)
        return Action(receipt=None)

    config = smpp_config({"local": [port]}, window=4)
    record = RecordingSink()
    messages = [message(i) for i in range(10)]
    with running(LocalSmsc(port=port, script=script)) as smsc:
        with connector_running(config, redis_url, record):
            provider = live_provider(smpp_redis, config)
            first = provider.send_many(messages)
            outcomes = Counter(r.outcome for r in first)
            unknown = [
                m for m, r in zip(messages, first, strict=True) if r.error_code == "outcome_unknown"
            ]
            # Held and dropped submits are never reported as safe to send again; at
            # most a window's worth can be in that state.
            assert 3 <= len(unknown) <= 4
            assert all(
                r.outcome is Outcome.UNKNOWN for r in first if r.error_code == "outcome_unknown"
            )
            assert all(provider.lookup(m)[0] is Lookup.UNKNOWN for m in unknown)
            # What the worker would try again (transient) goes out once the bind is back.
            retry = [
                m for m, r in zip(messages, first, strict=True) if r.outcome is Outcome.TRANSIENT
            ]
            assert outcomes[Outcome.ACCEPTED] + len(unknown) + len(retry) == 10
            wait_live(provider, "local")
            second = provider.send_many(retry)
            assert [(r.outcome, r.error_text) for r in second] == [(Outcome.ACCEPTED, None)] * len(
                retry
            )
            delivered_to = set()
            for m, r in [*zip(messages, first, strict=True), *zip(retry, second, strict=True)]:
                if r.outcome is Outcome.ACCEPTED:
                    assert provider.lookup(m) == (Lookup.ACCEPTED, r.provider_message_id)
                    delivered_to.add(m.to.lstrip("+"))
        smsc.release_held()
        per_destination = Counter(s.destination_addr for s in smsc.submits)
    assert set(per_destination.values()) == {1}
    # Every accepted one reached the SMSC once; one whose outcome is unknown may not
    # have reached it at all (in the socket when the session dropped), and is not re-sent.
    assert delivered_to == set(per_destination) - {m.to.lstrip("+") for m in unknown}
    assert len(delivered_to) == 10 - len(unknown)


def test_a_request_read_as_its_bind_ends_waits_for_the_next_bind(
    port: int, redis_url: str, smpp_redis: redis.Redis
) -> None:
    """The connector reads a request only while its transmitter is bound, but a read
    already waiting when the session ended took one for a connection with no bind: it was
    answered "connection busy or down" and its worker tried it again seconds later (CI saw
    it after a dropped window, where the bind came back a moment later). The request goes
    back to the head of the queue, nothing done with it, and the next bind sends it, once."""
    # Timers with room for a busy machine: the SMSC stops and starts while the worker waits.
    config = smpp_config({"local": [port]}, response_timeout=10, request_timeout=40)
    record = RecordingSink()
    with ThreadPoolExecutor(1) as pool, connector_running(config, redis_url, record) as connector:
        with running(LocalSmsc(port=port)) as first:
            provider = live_provider(smpp_redis, config)
            [link] = connector.links
            read = connector.redis.blpop
            reads: list[object] = []
            taken: list[object] = []

            async def read_as_the_smsc_goes(*args: object, **kwargs: object) -> object:
                reads.append(args)
                got = await read(*args, **kwargs)  # type: ignore[arg-type]
                if got is not None and not taken:
                    taken.append(got)
                    # The SMSC stops (the test leaves its block): the session ends.
                    ends = time.monotonic() + 20
                    while link.tx is not None and time.monotonic() < ends:
                        await asyncio.sleep(0.01)
                return got

            connector.redis.blpop = read_as_the_smsc_goes  # type: ignore[method-assign]
            wait_for(lambda: reads)  # the read that was waiting before has timed out
            sent = pool.submit(provider.send_many, [message(0)])
            wait_for(lambda: taken)
        # No SMSC, no bind: the request is back in its queue (or, the defect, answered).
        wait_for(lambda: smpp_redis.llen(queue_key("local")) == 1 or sent.done())
        with running(LocalSmsc(port=port)) as second:
            [result] = sent.result(timeout=20)
    assert (result.outcome, result.error_text) == (Outcome.ACCEPTED, None)
    assert first.submits == []
    assert [s.destination_addr for s in second.submits] == [message(0).to.lstrip("+")]


def test_a_connector_whose_loop_fails_ends_and_is_no_longer_routed_to(
    port: int, redis_url: str, smpp_redis: redis.Redis
) -> None:
    """The loops run beside each other until the connector stops. One that raised ended
    alone: its heartbeat still said the bind was live, workers still routed to it, and
    their requests waited unread until they timed out, with nothing to see but those
    timeouts. The connector now ends (its process exits for its supervisor to start it
    again), marked down, with the error."""
    config = smpp_config({"local": [port]})
    connector = Connector(config=config, redis_url=redis_url, sink=Sink(RecordingSink()))
    provider = SmppProvider(redis_client=smpp_redis, config=config)

    async def broken_read(*_: object, **__: object) -> object:
        raise ValueError("a defect in the read")

    async def run() -> None:
        await connector.run()

    with running(LocalSmsc(port=port)), ThreadPoolExecutor(1) as pool:
        ended = pool.submit(asyncio.run, run())
        wait_live(provider, "local")
        connector.redis.blpop = broken_read  # type: ignore[method-assign]
        try:
            with pytest.raises(ValueError, match="a defect in the read"):
                ended.result(timeout=30)
        finally:
            connector.stop()
    assert provider.live_carriers() == set()


def test_a_worker_whose_redis_socket_timeout_is_short_still_waits_for_its_answer(
    port: int,
    redis_url: str,
    smpp_redis: redis.Redis,  # its keys cleared
) -> None:
    """The worker waits for its answer in blocking reads of up to 5 s, below the 10 s
    socket timeout of Runtime.redis. A client with a shorter one (redis-py 8's default
    is 5 s) failed the read as a socket timeout, and the send task with it, though the
    answer was on its way. A read cut short by the socket timeout is read again."""
    config = smpp_config({"local": [port]}, response_timeout=10, request_timeout=20)
    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    smsc = LocalSmsc(port=port, script=lambda _: Action(delay=2.5))
    with running(smsc), connector_running(config, redis_url, RecordingSink()):
        provider = live_provider(client, config)
        [result] = provider.send_many([message(0)])
    client.close()
    assert (result.outcome, result.error_text) == (Outcome.ACCEPTED, None)
    assert len(smsc.submits) == 1


def lose_data(client: redis.Redis) -> None:
    """What a Redis restarted without its data leaves of the hand-off: nothing."""
    for key in client.scan_iter("dispatcher:smpp:*"):
        client.delete(key)


def test_a_submit_answered_before_redis_lost_its_data_is_never_submitted_again(
    port: int, redis_url: str, smpp_redis: redis.Redis
) -> None:
    """The connector submitted, the SMSC accepted, the answer was written; then Redis lost
    its data before the worker read it. No answer, no ledger entry, the request gone from
    the list: the SMSC may have it, so the outcome is unknown, not "try again"."""
    config = smpp_config({"local": [port]})
    with (
        running(LocalSmsc(port=port)) as smsc,
        connector_running(config, redis_url, RecordingSink()),
    ):
        provider = live_provider(smpp_redis, config)
        request_id, *handed = provider._push("local", [message(1)])
        wait_for(lambda: smpp_redis.exists(reply_key(request_id)))
        assert len(smsc.accepted) == 1
        lose_data(smpp_redis)
        handed[1] = time.time() + 0.3  # the worker's give-up time: no answer will come
        [result] = provider._wait("local", request_id, *handed)
    assert (result.outcome, result.error_code) == (Outcome.UNKNOWN, "outcome_unknown")
    assert "Redis lost" in (result.error_text or "")


def test_a_request_with_no_answer_is_sent_again_only_when_redis_kept_its_data(
    port: int, smpp_redis: redis.Redis
) -> None:
    """Taken from the list and not in the ledger, with Redis's data intact: the connector
    died before writing its ledger entry, so before submitting: safe to send again. The
    same after Redis lost its data cannot tell whether a connector took it first."""
    provider = SmppProvider(redis_client=smpp_redis, config=smpp_config({"local": [port]}))
    for lost in (False, True):
        request_id, *handed = provider._push("local", [message(1)])
        handed[1] = time.time() + 0.2
        # A connector takes it and dies at once; or Redis loses it (request and all).
        assert smpp_redis.lpop(queue_key("local")) == handed[0].encode()
        if lost:
            lose_data(smpp_redis)
        [result] = provider._wait("local", request_id, *handed)
        expected = (
            (Outcome.UNKNOWN, "outcome_unknown") if lost else (Outcome.TRANSIENT, "connector_lost")
        )
        assert (result.outcome, result.error_code) == expected


def test_a_reclaimed_claim_is_never_submitted_again_once_redis_lost_its_data_since(
    port: int, smpp_redis: redis.Redis
) -> None:
    """The reclaim of a dead worker's claim asks the ledger with the claim's time. No entry
    means "never submitted" only if the hand-off's data is older than the claim: if Redis
    lost it since (no generation, or a younger one), a connector may have submitted the
    message first, so it is unknown, never sent again. An entry answers as before."""
    provider = SmppProvider(redis_client=smpp_redis, config=smpp_config({"local": [port]}))
    msg = message(1)
    provider._push("local", [message(2)])  # the hand-off's data begins here
    claimed = datetime.now(UTC).replace(tzinfo=None)  # a claim since (naive UTC, as stored)
    assert provider.lookup(msg, claimed_at=claimed) == (Lookup.NOT_FOUND, None)
    assert provider.lookup(msg) == (Lookup.NOT_FOUND, None)  # no claim time: as before
    lose_data(smpp_redis)
    assert provider.lookup(msg, claimed_at=claimed) == (Lookup.UNKNOWN, None)
    provider._push("local", [message(2)])  # after the loss: younger than the claim
    assert provider.lookup(msg, claimed_at=claimed) == (Lookup.UNKNOWN, None)
    smpp_redis.set(ledger_key(msg.idempotency_key), "a:0000000042")
    assert provider.lookup(msg, claimed_at=claimed) == (Lookup.ACCEPTED, "0000000042")
    later = datetime.now(UTC) + timedelta(seconds=5)
    assert provider.lookup(message(3), claimed_at=later) == (Lookup.NOT_FOUND, None)


def test_a_connection_that_cannot_bind_is_reported_retried_and_never_logs_its_password(
    redis_url: str, smpp_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    config = smpp_config({"local": [port]})
    record = RecordingSink()
    caplog.set_level(logging.INFO)
    with connector_running(config, redis_url, record):
        provider = SmppProvider(redis_client=smpp_redis, config=config)
        wait_for(lambda: int(smpp_redis.hget(stats_key("local-0"), "bind_failures") or 0) >= 2)
        (result,) = provider.send_many([message(1)])
        assert result.outcome is Outcome.TRANSIENT
        assert result.error_code == "no_live_bind"
        with running(LocalSmsc(port=port)):
            wait_live(provider, "local")
            (result,) = provider.send_many([message(1)])
            assert result.outcome is Outcome.ACCEPTED
    assert "bind to 127.0.0.1" in caplog.text
    assert PASSWORD not in caplog.text


def test_a_route_with_no_live_bind_fails_over_to_the_next(
    redis_url: str, smpp_redis: redis.Redis
) -> None:
    dead, live = free_port(), free_port()
    config = smpp_config(
        {"primary": [dead], "backup": [live]},
        routes=[
            {"prefix": "+44", "carrier": "primary"},
            {"prefix": "+44", "carrier": "backup"},
            {"prefix": "+1", "carrier": "primary"},
        ],
    )
    record = RecordingSink()
    with running(LocalSmsc(port=live)) as smsc, connector_running(config, redis_url, record):
        provider = live_provider(smpp_redis, config, "backup")
        uk, us, fr = provider.send_many(
            [message(1), message(2, to="+15550100"), message(3, to="+33612345678")]
        )
        assert uk.outcome is Outcome.ACCEPTED
        assert smsc.submits[0].system_id == "backup"
        # The only route for +1 is down: later, not now; +33 has no route: next channel.
        assert (us.outcome, us.error_code) == (Outcome.TRANSIENT, "no_live_bind")
        assert (fr.outcome, fr.error_code) == (Outcome.CHANNEL, "no_route")
        assert fr.error_text == "no SMPP route for channel sms to +33612345678"


def test_inbound_messages_are_decoded_and_reassembled(
    port: int, redis_url: str, smpp_redis: redis.Redis
) -> None:
    config = smpp_config({"local": [port]})
    record = RecordingSink()
    long_text = "Ответ 😀 " * 30
    with running(LocalSmsc(port=port)) as smsc, connector_running(config, redis_url, record):
        live_provider(smpp_redis, config)  # the bind is up, so MO can flow
        assert (
            smsc.call(smsc.send_mo(source="+447700900001", destination="Dispatcher", text="Hi €{"))
            == 1
        )
        assert (
            smsc.call(smsc.send_mo(source="+447700900002", destination="447700", text=long_text))
            > 1
        )
        wait_for(lambda: len(record.inbound) == 2)
    short, long = sorted(record.inbound, key=lambda m: m.sender)
    assert (short.sender, short.to, short.body) == ("+447700900001", "Dispatcher", "Hi €{")
    assert (long.sender, long.body, long.data_coding) == ("+447700900002", long_text, 8)


def test_transmitter_and_receiver_binds_submit_on_one_and_read_receipts_and_mo_on_the_other(
    port: int, redis_url: str, smpp_redis: redis.Redis
) -> None:
    # smpp34 1.5.0's server sends deliver_sm to the receiver session and the ESME gets it,
    # but the server answers that session's deliver_sm_resp with generic_nack (found with a
    # hand-written receiver too), so on the SMSC's side each deliver_sm ends in an error.
    # What the ESME does is all tested: binds, submits on TX, receipts and MO read on RX.
    config = smpp_config({"local": [port]}, bind="transmitter_receiver")
    record = RecordingSink()
    smsc = LocalSmsc(port=port)
    with running(smsc), connector_running(config, redis_url, record):
        provider = live_provider(smpp_redis, config)
        wait_for(lambda: len(smsc.binds) == 2)
        results = provider.send_many([message(i) for i in range(5)])
        assert all(r.outcome is Outcome.ACCEPTED for r in results)
        wait_for(lambda: len(record.receipts) == 5)
        smsc.post_mo(source="+447700900001", destination="Dispatcher", text="Hi €")
        wait_for(lambda: len(record.inbound) == 1)
        sessions = {sid: e.can_receive for sid, e in smsc.sessions.items()}
    assert sorted(sessions.values()) == [False, True]
    for r in results:
        assert sessions[smsc.accepted[r.provider_message_id or ""].session_id] is False
    assert {r.provider_message_id for r in record.receipts} == {
        r.provider_message_id for r in results
    }
    assert (record.inbound[0].sender, record.inbound[0].body) == ("+447700900001", "Hi €")


def test_receipts_reach_the_workers_through_redis_intact_in_order_and_are_put_back_on_failure(
    smpp_redis: redis.Redis, port: int
) -> None:
    done = datetime(2026, 11, 30, 1, 2)
    first = [
        Receipt("0000000001", "delivered", done_at=done, carrier_status="DELIVRD"),
        Receipt(
            "0000000002",
            "failed",
            error_code="smpp_undeliv",
            error_text="UNDELIV err:034",
            done_at=None,
            carrier_status="UNDELIV:034",
        ),
    ]
    second = [Receipt("0000000003", "expired", done_at=done)]
    # The connector's production sink queues them; receipts are the only thing it sends there.
    asked: list[float] = []
    sink = DatabaseSink(
        sessions=cast(sessionmaker[Session], None), redis_client=smpp_redis, wake=asked.append
    )
    sink.receipts(first)
    sink.receipts(second)
    # Each group asks for the receipts task at once (receipts/wake.py), after it is queued.
    assert len(asked) == 2 and asked[0] <= asked[1] <= time.time()
    provider = SmppProvider(redis_client=smpp_redis, config=smpp_config({"local": [port]}))
    assert provider.due_receipts(limit=1) == first
    # A worker whose transaction failed puts them back ahead of what is still queued.
    provider.requeue_receipts(first)
    assert provider.due_receipts() == first + second
    assert provider.due_receipts() == []


def test_receipts_taken_by_a_killed_worker_come_back_once_its_claim_is_stale(
    smpp_redis: redis.Redis, port: int
) -> None:
    first = [Receipt("0000000011", "delivered", done_at=datetime(2026, 11, 30, 1, 2))]
    second = [Receipt("0000000012", "expired", done_at=None)]
    sink = DatabaseSink(sessions=cast(sessionmaker[Session], None), redis_client=smpp_redis)
    sink.receipts(first)
    sink.receipts(second)
    now = [1_000_000.0]
    config = smpp_config({"local": [port]})

    def worker() -> SmppProvider:
        return SmppProvider(redis_client=smpp_redis, config=config, clock=lambda: now[0])

    killed, other = worker(), worker()
    assert killed.due_receipts(limit=1) == first  # ...and the process dies before its commit
    # While the claim may still be a live worker's, nobody else gets those receipts.
    now[0] += CLAIM_STALE_S - 1
    assert other.due_receipts(limit=1) == second
    other.receipts_applied()
    assert other.due_receipts() == []
    # Older than any task can run: given back, ahead of anything queued since.
    sink.receipts([Receipt("0000000013", "delivered", done_at=None)])
    now[0] += 2
    assert [r.provider_message_id for r in other.due_receipts()] == ["0000000011", "0000000013"]
    other.receipts_applied()
    now[0] += 2 * CLAIM_STALE_S
    assert other.due_receipts() == []
    assert smpp_redis.zcard(RECEIPT_CLAIMS) == 0


def test_receipts_go_to_the_sink_at_every_flush_inbound_messages_once_a_second(
    port: int, redis_url: str, smpp_redis: redis.Redis
) -> None:
    """Receipts are a Redis push (cheap) and wait at most RECEIPTS_EVERY; inbound messages,
    a database transaction each group, are stored at most once a second."""
    record = RecordingSink()
    connector = Connector(
        config=smpp_config({"local": [port]}), redis_url=redis_url, sink=Sink(record)
    )
    receipt = Receipt("0000000021", "delivered", done_at=None)
    mo = Inbound("local", "local-0", "+447700900021", "+447700900022", "hi", datetime.now(UTC), 0)

    async def flushes() -> None:
        # What the binds' readers buffer (no submit in flight, so the receipt is ready).
        connector._receipts.append((time.monotonic(), receipt))
        connector._inbound.append(mo)
        await connector.flush()
        assert (record.receipts, record.inbound) == ([receipt], [])
        connector._inbound_flushed -= FLUSH_EVERY
        await connector.flush()
        assert (record.receipts, record.inbound) == ([receipt], [mo])
        await connector.redis.aclose()

    asyncio.run(flushes())
    assert RECEIPTS_EVERY < FLUSH_EVERY


def test_the_parts_kept_in_memory_are_bounded_and_leave_at_their_final_receipt(
    port: int, redis_url: str, smpp_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connector runs for weeks: the parts it remembers go at their final receipt (an
    ``enroute`` one keeps them), and past PARTS_KEPT the oldest go. A part no longer in
    memory is still found in Redis, so its receipt counts for its message."""
    monkeypatch.setattr(connector_module, "PARTS_KEPT", 3)
    record = RecordingSink()
    connector = Connector(
        config=smpp_config({"local": [port]}), redis_url=redis_url, sink=Sink(record)
    )

    async def receipts(*got: Receipt) -> None:
        connector._receipts.extend((time.monotonic(), r) for r in got)
        await connector.flush()

    async def parts() -> None:
        for main in ("a", "b"):
            await connector.remember_part(main, main, 2)
            await connector.remember_part(f"{main}-2", main, 2)
        assert list(connector.part_of) == ["a-2", "b", "b-2"]  # "a" went first
        await receipts(Receipt("b", "enroute", done_at=None))
        assert "b" in connector.part_of
        await receipts(*(Receipt(ref, "delivered", done_at=None) for ref in ("b", "b-2")))
        await receipts(*(Receipt(ref, "delivered", done_at=None) for ref in ("a", "a-2")))
        assert list(connector.part_of) == []
        assert [r.provider_message_id for r in record.receipts] == ["b", "a"]
        await connector.redis.aclose()

    asyncio.run(parts())


def test_receipts_outlive_a_redis_failure_and_a_database_failure_at_flush(
    port: int, redis_url: str, smpp_redis: redis.Redis
) -> None:
    """The carrier has had its deliver_sm_resp: a receipt exists only in the connector's
    buffer until the sink takes it. A flush that fails (Redis gone while parts are looked
    up, the database refusing inbound messages) keeps it for the next one."""
    record = RecordingSink()
    failing_inbound: list[int] = []

    class DownDatabase(Sink):
        def inbound(self, batch: Sequence[Inbound]) -> None:
            failing_inbound.append(len(batch))
            raise OperationalError("INSERT", {}, Exception("database is down"))

    # Nothing listens there: every Redis call fails, as a restarting Redis's would.
    down = f"redis://127.0.0.1:{free_port()}/0"
    connector = Connector(config=smpp_config({"local": [port]}), redis_url=down, sink=Sink(record))
    first = Receipt("0000000031", "delivered", done_at=None)
    second = Receipt("0000000032", "expired", done_at=None)
    mo = Inbound("local", "local-0", "+447700900031", "+447700900032", "hi", datetime.now(UTC), 0)

    async def flushes() -> None:
        connector._receipts.append((time.monotonic(), first))
        with pytest.raises(redis.ConnectionError):
            await connector.flush()
        assert record.receipts == []
        await connector.redis.aclose()
        connector.redis = aioredis.Redis.from_url(redis_url)  # Redis is back
        connector.sink = DownDatabase(record)  # ...and the database is down
        connector._receipts.append((time.monotonic(), second))
        connector._inbound.append(mo)
        with pytest.raises(OperationalError):
            await connector.flush(final=True)  # the connector stopping
        assert failing_inbound == [1]
        assert record.receipts == [first, second]
        await connector.redis.aclose()

    asyncio.run(flushes())


def test_a_redis_error_after_a_long_messages_submit_does_not_hold_later_receipts(
    port: int, redis_url: str, smpp_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A receipt waits until every submit begun before it has its submit_sm_resp (only
    then is a part's id known). A submit whose part could not be noted in Redis must
    still count as answered, or every receipt after it stays in the connector's memory."""
    # The connector's Redis user may not write how many parts are left: noting the parts
    # fails, as it would with Redis failing right then. Everything else is allowed.
    user = f"conn-{free_port()}"
    allowed = ["q", "r", "ledger", "alive", "stats", "part", "receipts", "mo"]
    rules = ["on", ">pw", "+@all", "~dispatcher:rl:*"]
    rules += [f"~dispatcher:smpp:{kind}*" for kind in allowed]
    smpp_redis.execute_command("ACL", "SETUSER", user, *rules)
    limited = redis_url.replace("redis://", f"redis://{user}:pw@")
    config = smpp_config({"local": [port]})
    record = RecordingSink()
    caplog.set_level(logging.ERROR, logger="dispatcher.channels.smpp.connector")

    def script(s: Submit) -> Action:
        # The long message's parts get no receipt (their count could not be kept).
        return Action(receipt=None if s.destination_addr.endswith("1") else "DELIVRD")

    try:
        with (
            running(LocalSmsc(port=port, script=script)) as smsc,
            connector_running(config, limited, record),
        ):
            provider = live_provider(smpp_redis, config)
            # A worker's request (its answer, never to come, is not waited for here).
            provider._push("local", [message(1, "x" * 161)])
            wait_for(lambda: len(smsc.submits) >= 1)  # its first part answered; not noted
            [result] = provider.send_many([message(2)])
            assert result.outcome is Outcome.ACCEPTED
            ref = result.provider_message_id
            got = wait_for(lambda: [r for r in record.receipts if r.provider_message_id == ref])
            assert got[0].status == "delivered"
        # The failed request is logged by the connector when it ends (by the time the
        # connector has stopped), not left for the garbage collector.
        failed = [r for r in caplog.records if "hand-off request failed" in r.getMessage()]
        assert failed and failed[0].levelno == logging.ERROR and failed[0].exc_info
    finally:
        smpp_redis.execute_command("ACL", "DELUSER", user)
