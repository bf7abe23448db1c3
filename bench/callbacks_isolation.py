"""How long one account's callbacks wait while another account's endpoint is a blackhole.

Starts a private Dispatcher (redis-server, SQLite, a send worker, a callback worker,
beat) in a temporary directory. Account A sends ``--a-batches`` x ``--a-recipients``
recipients whose callback URL is a TCP port on 127.0.0.1 that accepts connections and
never answers. Meanwhile account B sends a one-recipient batch every second for
``--duration`` seconds to a normal receiver. For every callback B receives, the lag is
its arrival time minus the status change it reports (the payload's timestamp).

Figures go to stdout as JSON lines; progress to stderr. Bounded by ``--timeout``.

    python -m bench.callbacks_isolation                # 3 x 1,000 for A, 60 s of B
    python -m bench.callbacks_isolation --duration 20  # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[1]


def log(text: str) -> None:
    print(f"[isolation {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def receive(port: int, out: str) -> None:
    """Account B's endpoint (its own process, so the bench's work cannot delay it):
    answers 204 and appends each callback's arrival time and payload to ``out``."""
    lock = threading.Lock()
    sink = open(out, "a", buffering=1)  # noqa: SIM115 (closed when the process ends)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            arrived = time.time()
            self.send_response(204)
            self.end_headers()
            with lock:
                sink.write(json.dumps([arrived, json.loads(body)]) + "\n")

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


def arrivals(path: Path) -> list[tuple[float, dict[str, Any]]]:
    """What the receiver process logged so far."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [tuple(json.loads(line)) for line in lines if line.endswith("]")]


def lag(arrived: float, payload: dict[str, Any]) -> float:
    at = datetime.strptime(payload["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return arrived - at.timestamp()


class Processes:
    """Child processes, each in its own process group; stopped newest first."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.children: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        out = (self.logs / f"{name}.log").open("wb")
        self.children.append(
            subprocess.Popen(
                argv,
                env=env or self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        log(f"started {name} (pid {self.children[-1].pid})")

    def check(self) -> None:
        for child in self.children:
            if child.poll() is not None:
                raise RuntimeError(f"{child.args!r} exited with {child.returncode}")

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        for child in reversed(self.children):
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait(timeout=5)


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from api.app import create_app
    from dispatcher.accounts import service as accounts
    from dispatcher.batches.models import Batch
    from dispatcher.config import Settings
    from dispatcher.db import transaction
    from dispatcher.devserver import redis_server_command
    from dispatcher.migrate import upgrade
    from dispatcher.webhooks.models import Callback
    from workers.celery_app import create_celery

    logs = tmp / "logs"
    logs.mkdir()
    port = free_port()
    procs = Processes(dict(os.environ), logs)
    procs.start("redis", redis_server_command(port=port, data_dir=tmp, persist=False))
    client = redis.Redis(port=port, socket_timeout=2)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    settings = Settings(
        var_dir=str(tmp / "var"),
        database_url=f"sqlite:///{tmp / 'dispatcher.db'}",
        redis_url=f"redis://127.0.0.1:{port}/0",
        embedded_redis=False,
        simulator={"latency_ms": 0, "receipt_delay": 1.0},
        default_account_rate=0,
        min_send_at_lead=0,
        callback_allowlist=("127.0.0.1",),
    )
    settings.var_path.mkdir(parents=True, exist_ok=True)
    upgrade(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env.update(settings.to_env())
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    procs.env = env
    celery = [sys.executable, "-m", "celery", "-A", "workers.main"]
    quiet = ["--without-heartbeat", "--without-mingle", "--without-gossip", "-l", "INFO"]
    procs.start(
        "send", [*celery, "worker", "-Q", "dispatch,send", "-c", "2", "-n", "send@%h", *quiet]
    )
    procs.start(
        "callbacks",
        [*celery, "worker", "-Q", "callbacks", "-c", str(args.callback_concurrency),
         "-n", "callbacks@%h", *quiet],
    )  # fmt: skip
    procs.start("beat", [*celery, "beat", "-s", str(tmp / "beat-schedule"), "-l", "INFO"])

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(512)  # the kernel accepts; nothing ever reads or answers
    blackhole = f"http://127.0.0.1:{hole.getsockname()[1]}/a"
    receiver_port = free_port()
    received = tmp / "received.jsonl"
    procs.start(
        "receiver",
        [sys.executable, "-m", "bench.callbacks_isolation", "--receive", str(receiver_port),
         "--into", str(received)],
    )  # fmt: skip
    receiver_url = f"http://127.0.0.1:{receiver_port}/b"

    app = create_celery(settings)
    runtime = app.runtime
    api = create_app(settings, runtime=runtime).test_client()
    with transaction(runtime.sessions) as session:
        keys = {}
        for name in ("A", "B"):
            account = accounts.create_account(session=session, name=name)
            keys[name] = accounts.create_key(session=session, account_id=account.id).key

    def post(name: str, numbers: list[str], url: str) -> str:
        reply = api.post(
            "/batch",
            json={"from": "Bench", "message": "hi", "destinations": numbers, "callback": url},
            headers={"Authorization": f"Bearer {keys[name]}"},
        )
        if reply.status_code != 200:
            raise RuntimeError(f"POST /batch: {reply.status_code} {reply.get_json()}")
        return str(reply.get_json()["identifier"])

    try:
        time.sleep(3)  # workers and beat start; not part of the figures
        procs.check()
        a_batches = []
        for i in range(args.a_batches):
            numbers = [f"+4477{10 + i:02d}{n:06d}" for n in range(args.a_recipients)]
            a_batches.append(post("A", numbers, blackhole))
        log(f"A: {args.a_batches} x {args.a_recipients} recipients, callbacks to a blackhole")
        started = time.monotonic()
        b_batches = 0
        while time.monotonic() - started < args.duration:
            post("B", [f"+447720{b_batches:06d}"], receiver_url)
            b_batches += 1
            procs.check()
            time.sleep(1.0)
        want = 3 * b_batches  # queued, sent, delivered
        end = time.monotonic() + args.timeout
        while len(arrivals(received)) < want and time.monotonic() < end:
            procs.check()
            time.sleep(0.2)
        lags = [lag(at, payload) for at, payload in arrivals(received)]
        with runtime.sessions() as session:
            a_states = Counter(
                dict(
                    session.execute(
                        select(Callback.state, func.count())
                        .where(Callback.batch_id.in_(a_batches))
                        .group_by(Callback.state)
                    ).all()
                )
            )
            a_attempts = session.scalar(
                select(func.coalesce(func.sum(Callback.attempts), 0)).where(
                    Callback.batch_id.in_(a_batches), Callback.state != "delivering"
                )
            )
            a_recipients = session.scalar(
                select(func.sum(Batch.recipient_count)).where(Batch.id.in_(a_batches))
            )
    finally:
        hole.close()
        runtime.dispose()
        procs.stop()
    return {
        "b_callbacks": len(lags),
        "b_callbacks_expected": want,
        "b_lag_s": {
            "p50": round(percentile(lags, 50) or 0, 3),
            "p95": round(percentile(lags, 95) or 0, 3),
            "p99": round(percentile(lags, 99) or 0, 3),
            "max": round(max(lags), 3) if lags else None,
        },
        "a_recipients": a_recipients,
        "a_callbacks_by_state": dict(a_states),
        "a_attempts_settled": a_attempts,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--a-batches", type=int, default=3)
    p.add_argument("--a-recipients", type=int, default=1000)
    p.add_argument("--duration", type=float, default=60.0, help="seconds B keeps sending")
    p.add_argument("--callback-concurrency", type=int, default=2)
    p.add_argument("--timeout", type=float, default=120.0, help="wait for B's callbacks")
    p.add_argument("--keep", action="store_true", help="keep the temp directory")
    p.add_argument("--receive", type=int, help=argparse.SUPPRESS)  # the receiver process
    p.add_argument("--into", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.receive:
        receive(args.receive, args.into)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="dispatcher-isolation-"))
    log(f"working directory {tmp}")
    result = run(args, tmp)
    line = {
        "metric": "callbacks_isolation",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg": os.getloadavg(),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
        "params": vars(args),
        **result,
    }
    print(json.dumps(line), flush=True)
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
