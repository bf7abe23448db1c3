"""The per-endpoint semaphore and circuit breaker, against a real Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dispatcher.webhooks.limits import EndpointGate, Grant, endpoint_key
from tests.helpers import free_port, wait_for

COOLDOWN = 0.3


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    try:
        yield c
    finally:
        c.close()


def gate(client: redis.Redis, *, limit: int = 3, lease: float = 60.0) -> EndpointGate:
    return EndpointGate(
        client, limit=limit, lease=lease, failures=3, cooldown=COOLDOWN, max_cooldown=1.0
    )


@pytest.fixture
def key() -> str:
    return endpoint_key(uuid.uuid4().hex, "https://hooks.example.com/x")


def test_endpoint_key_is_account_and_origin() -> None:
    a = endpoint_key("acct", "https://Hooks.example.com/a?batch=1")
    assert a == endpoint_key("acct", "https://hooks.example.com/b?batch=2")
    assert a != endpoint_key("other", "https://hooks.example.com/a")
    assert a != endpoint_key("acct", "https://hooks.example.com:8443/a")
    assert a != endpoint_key("acct", "http://hooks.example.com/a")


def test_slots_are_capped_across_callers_and_come_back(client: redis.Redis, key: str) -> None:
    g = gate(client, limit=3)
    first = g.acquire(key, 2)
    second = g.acquire(key, 2)
    assert (len(first.tokens), len(second.tokens)) == (2, 1)
    assert g.acquire(key, 1).tokens == ()  # at the limit
    g.release(key, first.tokens[0])
    again = g.acquire(key, 4)
    assert len(again.tokens) == 1 and not again.probe and again.wait == 0


def test_a_slot_redis_failed_to_take_back_is_given_back_when_it_answers(
    client: redis.Redis, key: str
) -> None:
    g = gate(client, limit=1)
    (token,) = g.acquire(key, 1).tokens
    # Nothing listens there; no retries (they only make the test slower).
    down = redis.Redis(host="127.0.0.1", port=free_port(), retry=Retry(NoBackoff(), 0))
    try:
        gate(down, limit=1).release(key, token)  # no error for the lane that calls it
    finally:
        down.close()
    # Not left held until its lease passes (60 s): the next call gives it back first.
    assert len(g.acquire(key, 1).tokens) == 1


def test_a_report_redis_fails_to_take_is_missed_not_raised(client: redis.Redis, key: str) -> None:
    down = redis.Redis(host="127.0.0.1", port=free_port(), retry=Retry(NoBackoff(), 0))
    try:
        # The lane that reports keeps its outcomes: the breaker is best effort.
        assert gate(down).report(key, ok=False, probe=False) == 0
    finally:
        down.close()
    g = gate(client)
    assert g.report(key, ok=False, probe=False) == 0
    assert g.report(key, ok=False, probe=False) == 0  # two on record: the missed one is not
    assert g.report(key, ok=False, probe=False) > 0


def test_a_slot_whose_holder_died_frees_when_its_lease_passes(
    client: redis.Redis, key: str
) -> None:
    g = gate(client, limit=1, lease=0.2)
    assert len(g.acquire(key, 1).tokens) == 1  # never released
    assert g.acquire(key, 1).tokens == ()
    wait_for(lambda: g.acquire(key, 1).tokens, timeout=5)


def probe_when_due(g: EndpointGate, key: str) -> Grant:
    """The first grant after the cooldown: the half-open breaker's probe."""

    def granted() -> Grant | None:
        grant = g.acquire(key, 3)
        return grant if grant.tokens else None

    grant: Grant = wait_for(granted, timeout=5)
    return grant


def test_breaker_opens_after_unanswered_attempts_then_probes_once(
    client: redis.Redis, key: str
) -> None:
    g = gate(client)
    assert g.report(key, ok=False, probe=False) == 0
    assert g.report(key, ok=False, probe=False) == 0
    assert 0 < g.report(key, ok=False, probe=False) <= COOLDOWN  # the third opens it

    held = g.acquire(key, 3)
    assert held.tokens == () and 0 < held.wait <= COOLDOWN

    probe = probe_when_due(g, key)
    assert probe.probe and len(probe.tokens) == 1  # half-open: exactly one lane
    waiting = g.acquire(key, 3)  # others wait while the probe is out
    assert waiting.tokens == () and waiting.wait > 0
    assert g.report(key, ok=True, probe=True) == 0  # the probe got an answer: closed
    g.release(key, probe.tokens[0])
    closed = g.acquire(key, 3)
    assert len(closed.tokens) == 3 and not closed.probe and closed.wait == 0


def test_a_failed_probe_reopens_for_longer(client: redis.Redis, key: str) -> None:
    g = gate(client)
    for _ in range(3):
        g.report(key, ok=False, probe=False)
    probe = probe_when_due(g, key)
    assert probe.probe
    reopened = g.report(key, ok=False, probe=True)
    assert COOLDOWN < reopened <= 2 * COOLDOWN  # doubled
    g.release(key, probe.tokens[0])
    grant = g.acquire(key, 1)
    assert grant.tokens == () and grant.wait > COOLDOWN


def test_an_answer_resets_the_count(client: redis.Redis, key: str) -> None:
    g = gate(client)
    g.report(key, ok=False, probe=False)
    g.report(key, ok=False, probe=False)
    g.report(key, ok=True, probe=False)
    assert g.report(key, ok=False, probe=False) == 0  # one in a row, not three
    assert len(g.acquire(key, 1).tokens) == 1


def test_held_for_tells_without_taking_a_slot(client: redis.Redis, key: str) -> None:
    g = gate(client, limit=2)
    assert g.held_for(key) == (0, 0)
    taken = g.acquire(key, 2)
    wait, busy = g.held_for(key)
    assert wait == 0 and busy >= 0 and len(taken.tokens) == 2
    g.release(key, taken.tokens[0])
    assert g.held_for(key) == (0, 0)
    for _ in range(3):
        g.report(key, ok=False, probe=False)
    wait, _ = g.held_for(key)
    assert 0 < wait <= COOLDOWN
    assert len(g.acquire(key, 0).tokens) == 0  # held_for took nothing
