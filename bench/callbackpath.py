"""CPU per callback of the callback worker's task, in one process, against bench/sink.py.

    python -m bench.callbackpath [--database postgres] [--callbacks 6000] [--profile out.prof]

No Celery, no API, no send worker: a real redis-server, a real database and the sink in
its own process. Callback rows are written as a status change writes them (native
payloads, one group of ``--group`` per status change, three status changes per
recipient), then ``deliver()`` (the task body) is called once per group, as the worker
gets them, timed with ``os.times`` (user and system) (every thread of this process: the lanes'
POSTs included). CPU time of this process barely moves with the machine's load, so this
is the figure to compare on a busy machine. One JSON line on stdout.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
import requests
from sqlalchemy import func, insert, select

from bench.harness import free_port, machine
from bench.sendpath import database_url, find_postmaster, server_cpu, start_redis
from dispatcher.accounts import service as accounts
from dispatcher.config import Settings
from dispatcher.db import new_id, read_transaction, transaction, utcnow
from dispatcher.migrate import upgrade
from dispatcher.outbox import Message, Revoke
from dispatcher.runtime import Runtime
from dispatcher.webhooks import delivery
from dispatcher.webhooks.models import Callback
from dispatcher.webhooks.payloads import iso

STATUSES = ("queued", "sent", "delivered")


class Discard:
    """A publisher that drops what it is given (each group is delivered directly)."""

    def publish(self, messages: list[Message | Revoke]) -> None:
        pass


def start_sink(stack: ExitStack) -> str:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.sink", "--port", str(port)], stdout=subprocess.DEVNULL
    )
    stack.callback(proc.wait, 20)
    stack.callback(proc.terminate)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.get(f"{base}/stats", timeout=5).raise_for_status()
            return base
        except requests.RequestException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def write_groups(rt: Runtime, *, account_id: str, url: str, args: argparse.Namespace) -> list:
    """Insert the callback rows, one group per status change; returns the groups' ids."""
    groups = []
    now = utcnow() - timedelta(seconds=1)
    batch_id = new_id()
    for g in range(args.callbacks // args.group):
        status = STATUSES[g % len(STATUSES)]
        rows = []
        for i in range(args.group):
            recipient_id = new_id()
            payload = {
                "type": f"message.{status}",
                "batchUuid": batch_id,
                "messageUuid": recipient_id,
                "to": f"+4477{g:04d}{i:05d}",
                "from": "Bench",
                "channel": "sms",
                "status": status,
                "error": None,
                "timestamp": iso(now),
                "id": None,
            }
            rows.append(
                {
                    "id": new_id(),
                    "account_id": account_id,
                    "batch_id": batch_id,
                    "recipient_id": recipient_id,
                    "event_type": payload["type"],
                    "url": url,
                    "payload": payload,
                    "state": "pending",
                    "attempts": 0,
                    "next_attempt_at": now,
                    "enqueued_at": now,
                    "created_at": now,
                }
            )
        with transaction(rt.sessions) as session:
            session.connection().execute(insert(Callback), rows)
        groups.append([r["id"] for r in rows])
    return groups


def run(args: argparse.Namespace) -> dict[str, Any]:
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dispatcher-cbpath-")))
        sink = start_sink(stack)
        settings = Settings(
            var_dir=str(tmp / "var"),
            database_url=database_url(stack, tmp, args.database),
            redis_url=start_redis(stack, tmp),
            callback_allowlist=("127.0.0.1",),
        )
        upgrade(settings)
        postmaster = find_postmaster(settings.database_url)
        rt = Runtime(settings, Discard())
        stack.callback(rt.dispose)
        with transaction(rt.sessions) as session:
            account = accounts.create_account(session=session, name="bench")
            if args.sinch:
                account.callback_signing = "sinch"
        groups = write_groups(rt, account_id=account.id, url=f"{sink}/callback", args=args)
        total = sum(len(g) for g in groups)
        sender = rt.webhook_sender
        stack.callback(sender.close)
        gate = delivery.gate_for(
            redis_client=redis.Redis.from_url(settings.redis_url), settings=settings
        )
        profile = cProfile.Profile(time.thread_time) if args.profile else None
        counts: dict[str, int] = {}
        d = server_cpu(postmaster)
        times, wall = os.times(), time.perf_counter()
        if profile is not None:
            profile.enable()
        for ids in groups:
            got = delivery.deliver(
                factory=rt.sessions, settings=settings, sender=sender, gate=gate, callback_ids=ids
            )
            for k, v in got.items():
                counts[k] = counts.get(k, 0) + v
        if profile is not None:
            profile.disable()
        end, wall = os.times(), time.perf_counter() - wall
        user, system = end.user - times.user, end.system - times.system
        cpu = user + system
        server = server_cpu(postmaster) - d
        received = requests.get(f"{sink}/stats", timeout=10).json()["received"]
        with read_transaction(rt.sessions) as session:
            states = dict(
                session.execute(select(Callback.state, func.count()).group_by(Callback.state)).all()
            )
        if profile is not None:
            profile.dump_stats(args.profile)
        return {
            "metric": "callback_path_cpu",
            "date": utcnow().isoformat(timespec="seconds") + "Z",
            "loadavg": list(os.getloadavg()),
            "machine": machine(),
            "params": vars(args),
            "callbacks": total,
            "cpu_ms_per_callback": round(1000 * cpu / total, 4),
            # The kernel's share: system calls, and loopback TCP delivered in the sender's time.
            "system_cpu_ms_per_callback": round(1000 * system / total, 4),
            "wall_s": round(wall, 2),
            # PostgreSQL only: its server processes' CPU (clock ticks: coarse on small runs).
            "database_cpu_ms_per_callback": round(1000 * server / total, 4),
            "received": received,
            "states": states,
            "counts": {k: v for k, v in counts.items() if v},
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--callbacks", type=int, default=6000)
    p.add_argument("--group", type=int, default=500, help="callbacks per status change (task)")
    p.add_argument("--sinch", action="store_true", help="sign the Sinch way as well")
    p.add_argument("--profile", default=None, help="write a cProfile of deliver() here")
    print(json.dumps(run(p.parse_args())), flush=True)


if __name__ == "__main__":
    main()
