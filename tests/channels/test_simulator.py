"""The simulator's rules and ledger, on real Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from dispatcher.channels.base import (
    RECEIPT_CLAIM_STALE_S,
    Lookup,
    OutboundMessage,
    Outcome,
    Receipt,
)
from dispatcher.channels.simulator import HANDOFFS, LEDGER, RECEIPT_CLAIMS, RECEIPTS, Simulator

RULES = {
    "unreachable": {"rcs": [r"^\+4477009"]},
    "invalid": [r"^\+4477008"],
    "transient": {"sms": {"pattern": r"^\+4477007", "times": 2}},
    "undeliverable": [r"^\+4477006"],
    "receipt_delay": 10,
}


@pytest.fixture()
def client(redis_url: str) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_url)

    def clear() -> None:
        r.delete(HANDOFFS, LEDGER, RECEIPTS, RECEIPT_CLAIMS, *r.keys(f"{RECEIPT_CLAIMS}:*"))

    clear()
    yield r
    clear()
    r.close()


def msg(to: str, channel: str = "sms", attempt: int = 1, rid: str = "r") -> OutboundMessage:
    return OutboundMessage(
        recipient_id=rid, channel=channel, to=to, sender="S", body="b", attempt=attempt
    )


def test_rules_decide_the_outcome(client: redis.Redis) -> None:
    sim = Simulator(redis_client=client, rules=RULES)
    assert sim.send(msg("+447700900001", "rcs")).outcome is Outcome.CHANNEL
    assert sim.send(msg("+447700900001", "sms")).outcome is Outcome.ACCEPTED
    assert sim.send(msg("+447700800001")).outcome is Outcome.RECIPIENT
    assert sim.send(msg("+447700700001", attempt=2)).outcome is Outcome.TRANSIENT
    assert sim.send(msg("+447700700001", attempt=3)).outcome is Outcome.ACCEPTED


def test_fail_rate_is_repeatable(client: redis.Redis) -> None:
    sim = Simulator(redis_client=client, rules={"fail_rate": {"sms": 0.5}})
    first = [sim.send(msg("+447700500001", rid=f"r{i}")).outcome for i in range(200)]
    again = [sim.send(msg("+447700500001", rid=f"r{i}")).outcome for i in range(200)]
    assert first == again
    assert 60 < first.count(Outcome.TRANSIENT) < 140


def test_ledger_counts_handoffs_and_answers_lookups(client: redis.Redis) -> None:
    sim = Simulator(redis_client=client, rules=RULES)
    sim.send_many([msg("+447700100001", rid="a"), msg("+447700100002", rid="b")])
    sim.send(msg("+447700100001", rid="a"))
    assert sim.handoffs() == {"a:sms": 2, "b:sms": 1}
    assert sim.lookup(msg("+447700100001", rid="a")) == (Lookup.ACCEPTED, "sim-a:sms")
    assert sim.lookup(msg("+447700100001", rid="zzz")) == (Lookup.NOT_FOUND, None)


def test_receipts_come_due_after_the_delay_once(client: redis.Redis) -> None:
    now = [1000.0]
    sim = Simulator(redis_client=client, rules=RULES, clock=lambda: now[0])
    sim.send_many([msg("+447700100001", rid="ok"), msg("+447700600001", rid="bad")])
    assert sim.due_receipts() == []
    now[0] += 10
    due = {r.provider_message_id: r.status for r in sim.due_receipts()}
    assert due == {"sim-ok:sms": "delivered", "sim-bad:sms": "failed"}
    assert sim.due_receipts() == []


def test_due_receipts_pop_the_oldest_due_up_to_the_limit(client: redis.Redis) -> None:
    now = [1000.0]
    sim = Simulator(redis_client=client, rules={"receipt_delay": 5}, clock=lambda: now[0])
    for i in range(5):
        sim.send(msg(f"+44770010000{i}", rid=f"r{i}"))
        now[0] += 1  # r0 is due at 1005, r4 at 1009
    now[0] = 1007.5
    assert [r.provider_message_id for r in sim.due_receipts(limit=2)] == [
        "sim-r0:sms",
        "sim-r1:sms",
    ]
    assert [r.provider_message_id for r in sim.due_receipts(limit=2)] == ["sim-r2:sms"]
    assert sim.due_receipts(limit=2) == []
    assert client.zcard(RECEIPTS) == 2  # r3 and r4: not due yet, still kept


def ids(receipts: list[Receipt]) -> set[str]:
    return {r.provider_message_id for r in receipts}


def test_claimed_receipts_stay_in_redis_until_the_worker_commits(client: redis.Redis) -> None:
    now = [1000.0]
    sim = Simulator(redis_client=client, rules={"receipt_delay": 5}, clock=lambda: now[0])
    sim.send_many([msg("+447700100001", rid="a"), msg("+447700100002", rid="b")])
    now[0] += 5
    assert ids(sim.due_receipts()) == {"sim-a:sms", "sim-b:sms"}
    # The worker is killed before its commit: no other worker takes them meanwhile...
    other = Simulator(redis_client=client, rules={"receipt_delay": 5}, clock=lambda: now[0])
    now[0] += RECEIPT_CLAIM_STALE_S - 1
    assert other.due_receipts() == []
    # ...and once the claim is older than any task can run, they come back, once.
    now[0] += 2
    assert ids(other.due_receipts()) == {"sim-a:sms", "sim-b:sms"}
    other.receipts_applied()
    now[0] += 2 * RECEIPT_CLAIM_STALE_S
    assert other.due_receipts() == []
    assert client.zcard(RECEIPT_CLAIMS) == 0
    assert client.zcard(RECEIPTS) == 0


def test_requeued_receipts_are_due_again_at_once_and_keep_their_due_time(
    client: redis.Redis,
) -> None:
    now = [1000.0]
    sim = Simulator(redis_client=client, rules={"receipt_delay": 5}, clock=lambda: now[0])
    sim.send(msg("+447700100001", rid="a"))
    now[0] += 1
    sim.send(msg("+447700100002", rid="b"))
    now[0] += 10
    due = sim.due_receipts()
    assert ids(due) == {"sim-a:sms", "sim-b:sms"}
    sim.requeue_receipts(due)  # e.g. the transaction failed
    assert client.zcard(RECEIPT_CLAIMS) == 0
    assert sorted(score for _, score in client.zrange(RECEIPTS, 0, -1, withscores=True)) == [
        1005.0,
        1006.0,
    ]
    assert [r.provider_message_id for r in sim.due_receipts()] == ["sim-a:sms", "sim-b:sms"]
    sim.receipts_applied()
    assert sim.due_receipts() == []
    assert client.zcard(RECEIPT_CLAIMS) == 0


def test_a_group_with_receipts_asks_for_the_receipts_task_when_they_are_due(
    client: redis.Redis,
) -> None:
    asked: list[float] = []
    sim = Simulator(redis_client=client, rules=RULES, clock=lambda: 1_000.0, wake=asked.append)
    sim.send_many([msg("+447700900001", rid="a"), msg("+447700900002", rid="b")])
    assert asked == [1_010.0]  # one wake-up for the group, at now + receipt_delay
    # Nothing accepted, so no receipt is held and nothing is asked for.
    sim.send_many([msg("+447700800001", rid="c"), msg("+447700900003", "rcs", rid="d")])
    assert asked == [1_010.0]
    # A group with one accepted message among refused ones holds its receipt.
    sim.send_many([msg("+447700800002", rid="e"), msg("+447700900004", rid="f")])
    assert asked == [1_010.0, 1_010.0]
