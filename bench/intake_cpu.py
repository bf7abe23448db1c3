"""The API's CPU per recipient for POST /batch, measured in process (robust under load).

Wall-clock intake rates swing with whatever else runs on the machine; the CPU
time one request costs this process (``time.process_time``) barely does. This
builds the real app (``api.app.create_app``) on a fresh, migrated database and
posts ``--requests`` batches of ``--size`` destinations through Flask's test
client, one after another, each with distinct numbers and a pre-serialised body.
It prints one JSON line (``intake_cpu``): CPU and wall microseconds per
recipient (median, best, worst), and with ``--stages`` the CPU per recipient of
each step of the request (JSON parse, schema load, the service, the commit).
On SQLite it also reports how long each request held the write lock (from
``BEGIN IMMEDIATE``'s return to the end of ``COMMIT``, CPU and wall): while intake
runs beside a send worker, that is the time the worker waits for it, and the rest
of the request runs beside the worker; and how long it waited at the write gate
(``gate_wait_us_per_recipient``). With ``--beside-sending N`` that worker is real:
``--senders`` (2) processes fan out and send N batches of 1,000 of their own on
the same database (the task bodies, as ``bench.sendpath`` calls them) while the
requests are measured; ``--worker-gives-way 0`` makes them never let the API's
writer go first (``WriteGate.YIELD_TURNS``), to compare.

    .venv/bin/python -m bench.intake_cpu                       # SQLite, 30 x 1,000
    .venv/bin/python -m bench.intake_cpu --database postgres   # a throw-away PostgreSQL
    .venv/bin/python -m bench.intake_cpu --profile 25          # + cProfile, top 25 (stderr)
    .venv/bin/python -m bench.intake_cpu --beside-sending 60   # the gate's waits, beside sending

What it leaves out: gunicorn's HTTP parsing and socket I/O (a few us per
recipient for a 20 kB body) and the publish of the dispatch task (the app gets
a publisher that drops it: one message per batch, not per recipient).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.harness import log, machine
from bench.intake import numbers


class _Dropped:
    """A publisher that drops what the app publishes (no broker in this process)."""

    def publish(self, messages: list[Any]) -> None:
        pass


@contextlib.contextmanager
def _database(kind: str, tmp: Path) -> Iterator[str]:
    if kind == "postgres":
        from scripts.pgtest import running_postgres, unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise SystemExit(f"--database postgres: {reason}")
        with running_postgres() as url:
            yield url
    else:
        yield f"sqlite:///{tmp / 'dispatcher.db'}"


def _bodies(count: int, size: int) -> list[bytes]:
    return [
        json.dumps(
            {"from": "Dispatcher", "message": "Benchmark message", "destinations": numbers(i, size)}
        ).encode()
        for i in range(count)
    ]


def _stages(app: Any, body: bytes, key: str, size: int) -> dict[str, float]:
    """CPU us per recipient of each step of one request, run outside the view."""
    from api import context as ctx
    from api.dialects.mplus import schemas
    from api.dialects.mplus.dump import batch_of
    from dispatcher.batches import service

    out: dict[str, float] = {}
    with app.test_request_context(
        "/batch?allowMulti=true",
        method="POST",
        data=body,
        content_type="application/json",
        headers={"Authorization": f"Bearer {key}"},
    ):

        def step(name: str, fn: Any) -> Any:
            t0 = time.process_time()
            value = fn()
            out[name] = round((time.process_time() - t0) / size * 1e6, 2)
            return value

        account = step("authenticate", ctx.account)
        raw = step("json_parse", ctx.json_body)
        data = step("schema_load", lambda: schemas.BatchSchema(settings=ctx.settings()).load(raw))
        new = batch_of(data, allow_multi=True)
        session = ctx.session()
        step(
            "create_batch",
            lambda: service.create_batch(
                session=session, settings=ctx.settings(), account=account, new=new
            ),
        )
        step("commit", session.commit)
        session.close()
        from flask import g

        g.pop("db_session", None)
    return out


class _HoldTimer:
    """CPU and wall seconds of each write transaction of this process (SQLite's gated
    connections: from ``BEGIN IMMEDIATE``'s return, the lock taken, to after ``COMMIT``;
    before 2026-11-30 06:00 UTC from before the gate, its wait included)."""

    def __init__(self) -> None:
        self.started: tuple[float, float] | None = None
        self.held: list[tuple[float, float]] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        from dispatcher.db import GatedConnection

        begin, commit = GatedConnection.begin_write, GatedConnection.commit

        def timed_begin(conn: GatedConnection, **options: Any) -> None:
            # From when the lock is ours: the wait at the gate before is counted apart.
            begin(conn, **options)
            self.started = (time.process_time(), time.perf_counter())

        def timed_commit(conn: GatedConnection) -> None:
            try:
                commit(conn)
            finally:
                if self.started is not None:
                    c0, w0 = self.started
                    self.held.append((time.process_time() - c0, time.perf_counter() - w0))
                    self.started = None

        GatedConnection.begin_write = timed_begin  # type: ignore[method-assign,assignment]
        GatedConnection.commit = timed_commit  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            GatedConnection.begin_write = begin  # type: ignore[method-assign]
            GatedConnection.commit = commit  # type: ignore[method-assign]


def _sender(
    settings: Any, batch_ids: list[str], gives_way: int, started: Any, stop: Any, out: Any
) -> None:
    """A send worker in its own process: fans out and sends ``batch_ids`` on the same
    database (the real task bodies, as bench.sendpath calls them) until ``stop``."""
    from bench.sendpath import Collect, InProcess
    from dispatcher.db import WriteGate
    from dispatcher.runtime import Runtime

    WriteGate.YIELD_TURNS = gives_way
    sender = InProcess.__new__(InProcess)  # its send() on this process's own runtime
    sender.settings, sender.publisher = settings, Collect()
    sender.rt = Runtime(settings, sender.publisher)
    started.set()
    c0, w0, sent = time.process_time(), time.perf_counter(), 0
    for batch_id in batch_ids:
        if stop.is_set():
            break
        sender.send(batch_id, lambda _part, call: call())
        sent += 1
    out.put(
        {
            "batches_sent": sent,
            "cpu_s": round(time.process_time() - c0, 3),
            "wall_s": round(time.perf_counter() - w0, 3),
            "gate": WriteGate.stats()["worker"],
        }
    )
    sender.rt.dispose()


@contextlib.contextmanager
def _beside_sending(args: argparse.Namespace, settings: Any, tmp: Path) -> Iterator[Any]:
    """A sender process working through batches of its own while the block runs; yields
    a callable that stops it and returns its figures."""
    import multiprocessing
    from contextlib import ExitStack
    from datetime import timedelta

    from bench.sendpath import start_redis
    from dispatcher.accounts import service as accounts
    from dispatcher.batches import service as batches
    from dispatcher.db import transaction, utcnow
    from dispatcher.runtime import Runtime

    with ExitStack() as stack:
        sending = settings.replace(
            redis_url=start_redis(stack, tmp),
            provider="simulator",
            simulator={"latency_ms": 0, "receipt_delay": 3600},
            chunk_size=1000,
        )
        runtime = Runtime(sending, _Dropped())
        batch_ids = []
        with transaction(runtime.sessions) as session:
            account = accounts.create_account(session=session, name="sender")
        for b in range(args.beside_sending):
            with transaction(runtime.sessions) as session:
                new = batches.NewBatch(
                    sender="Bench",
                    body="hello",
                    destinations=[f"+4478{b:04d}{i:05d}" for i in range(1000)],
                    channels=["sms"],
                    send_at=utcnow() - timedelta(seconds=1),
                )
                batch_ids.append(
                    batches.create_batch(
                        session=session, settings=sending, account=account, new=new
                    ).batch.id
                )
        runtime.dispose()
        spawn = multiprocessing.get_context("spawn")
        stop, out = spawn.Event(), spawn.Queue()
        children = []
        for n in range(args.senders):
            started = spawn.Event()
            mine = batch_ids[n :: args.senders]
            gives_way = args.worker_gives_way
            child = spawn.Process(
                target=_sender, args=(sending, mine, gives_way, started, stop, out)
            )
            child.start()
            children.append((child, started))
        try:
            if not all(started.wait(60) for _, started in children):
                raise SystemExit("a sender process did not start")

            def finish() -> list[dict[str, Any]]:
                stop.set()
                return [dict(out.get(timeout=120)) for _ in children]

            yield finish
        finally:
            stop.set()
            for child, _ in children:
                child.join(timeout=60)
                if child.is_alive():
                    child.kill()
                    child.join()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from api.app import create_app
    from dispatcher.accounts import service as accounts
    from dispatcher.config import Settings
    from dispatcher.db import WriteGate, transaction
    from dispatcher.migrate import upgrade
    from dispatcher.runtime import Runtime

    tmp = Path(tempfile.mkdtemp(prefix="dispatcher-intake-cpu-"))
    try:
        with _database(args.database, tmp) as url:
            settings = Settings(
                var_dir=str(tmp / "var"),
                database_url=url,
                redis_url="redis://127.0.0.1:1/0",  # never used: nothing here reaches Redis
                embedded_redis=False,
                min_send_at_lead=0,
                default_account_rate=0,
            )
            settings.var_path.mkdir(parents=True, exist_ok=True)
            upgrade(settings)
            runtime = Runtime(settings, _Dropped())
            with transaction(runtime.sessions) as session:
                account = accounts.create_account(session=session, name="bench")
                key = accounts.create_key(session=session, account_id=account.id).key
            app = create_app(settings, runtime=runtime)
            client = app.test_client()
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            total = args.warmup + args.requests + (1 if args.stages else 0)
            bodies = _bodies(total, args.size)
            cpu: list[float] = []
            wall: list[float] = []
            gate_wait: list[float] = []
            profiler = cProfile.Profile() if args.profile else None
            timer = _HoldTimer()
            held: list[tuple[float, float]] = []
            beside = contextlib.ExitStack()
            finish = (
                beside.enter_context(_beside_sending(args, settings, tmp))
                if args.beside_sending
                else None
            )
            for i, body in enumerate(bodies[: args.warmup + args.requests]):
                measured = i >= args.warmup
                if profiler and measured:
                    profiler.enable()
                timer.held.clear()
                waited = WriteGate.stats()["api"]["waited_s"]
                c0, w0 = time.process_time(), time.perf_counter()
                with timer.installed():
                    reply = client.post("/batch?allowMulti=true", data=body, headers=headers)
                c1, w1 = time.process_time(), time.perf_counter()
                if profiler and measured:
                    profiler.disable()
                if reply.status_code != 200:
                    raise SystemExit(f"POST /batch: {reply.status_code} {reply.get_data()[:300]!r}")
                if measured:
                    cpu.append((c1 - c0) / args.size * 1e6)
                    wall.append((w1 - w0) / args.size * 1e6)
                    waited = WriteGate.stats()["api"]["waited_s"] - waited
                    gate_wait.append(waited / args.size * 1e6)
                    if timer.held:
                        cpu_s, wall_s = (sum(x) for x in zip(*timer.held, strict=True))
                        held.append((cpu_s / args.size * 1e6, wall_s / args.size * 1e6))
            sender = finish() if finish else None
            beside.close()
            stages = _stages(app, bodies[-1], key, args.size) if args.stages else None
            runtime.dispose()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if profiler:
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("cumulative").print_stats(args.profile)
        stats.sort_stats("tottime").print_stats(args.profile)
        print(text.getvalue(), file=sys.stderr)
    result: dict[str, Any] = {
        "metric": "intake_cpu",
        "cpu_us_per_recipient": {
            "median": round(statistics.median(cpu), 1),
            "min": round(min(cpu), 1),
            "max": round(max(cpu), 1),
        },
        "wall_us_per_recipient": {
            "median": round(statistics.median(wall), 1),
            "min": round(min(wall), 1),
        },
        "cpu_ceiling_recipients_per_s_per_core": round(1e6 / statistics.median(cpu)),
        "stages_cpu_us_per_recipient": stages,
        "write_lock_held_us_per_recipient": (
            {
                "cpu_median": round(statistics.median(c for c, _ in held), 1),
                "wall_median": round(statistics.median(w for _, w in held), 1),
                "wall_min": round(min(w for _, w in held), 1),
            }
            if held
            else None
        ),
        # The API's wait at SQLite's write gate (WriteGate), per recipient of a request.
        "gate_wait_us_per_recipient": {
            "median": round(statistics.median(gate_wait), 1),
            "mean": round(statistics.mean(gate_wait), 1),
            "max": round(max(gate_wait), 1),
        },
        # --beside-sending: each sender process, its waits at the gate and how often it
        # let the API go first.
        "sender": sender,
        "params": {
            "beside_sending": args.beside_sending,
            "senders": args.senders,
            "worker_gives_way": args.worker_gives_way,
            "database": args.database,
            "requests": args.requests,
            "size": args.size,
            "warmup": args.warmup,
        },
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--requests", type=int, default=30, help="measured POST /batch requests")
    p.add_argument("--size", type=int, default=1000, help="destinations per batch")
    p.add_argument("--warmup", type=int, default=3, help="requests before measuring")
    p.add_argument("--stages", action="store_true", help="CPU per step of one more request")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile, top N rows")
    p.add_argument(
        "--beside-sending",
        type=int,
        default=0,
        metavar="BATCHES",
        help="SQLite: a send worker process sends this many batches of 1,000 meanwhile",
    )
    p.add_argument(
        "--worker-gives-way",
        type=int,
        default=4,
        metavar="N",
        help="the senders' WriteGate.YIELD_TURNS (0: they never let the API go first)",
    )
    p.add_argument(
        "--senders", type=int, default=2, help="--beside-sending: sender processes (-c 2)"
    )
    args = p.parse_args(argv)
    log(f"intake_cpu: {args.requests} x {args.size} on {args.database}")
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
