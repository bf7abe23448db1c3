"""CPU per recipient of the send path, in one process: fan-out, then send every chunk.

    python -m bench.sendpath [--database postgres] [--recipients 20000] [--profile out.prof]

No Celery, no API, no other process of ours: a real redis-server and a real
database, the batches written by the intake service, then ``dispatch_batch``
and ``send_recipients`` (the two task bodies) called in turn, timed with
``time.process_time``. CPU time of this process barely moves with the machine's
load, so this is the figure to compare on a busy machine. With PostgreSQL the
server's own CPU is given apart (``database_cpu_ms_per_recipient``). One JSON
line on stdout.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import create_engine, func, select
from sqlalchemy.pool import NullPool

from bench.harness import free_port, machine
from dispatcher.accounts import service as accounts
from dispatcher.batches import service as batches
from dispatcher.batches.models import Recipient, StatusEvent
from dispatcher.config import Settings
from dispatcher.db import read_transaction, transaction, utcnow
from dispatcher.devserver import redis_server_command
from dispatcher.engine import scheduling, sending
from dispatcher.migrate import upgrade
from dispatcher.outbox import Message, Revoke, TaskName
from dispatcher.runtime import Runtime
from workers.celery_app import settle_gc


class Collect:
    """A publisher that keeps the send tasks instead of publishing them."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def publish(self, messages: list[Message | Revoke]) -> None:
        self.messages += [m for m in messages if isinstance(m, Message)]


def start_redis(stack: ExitStack, tmp: Path) -> str:
    port = free_port()
    argv = redis_server_command(port=port, data_dir=tmp, persist=False)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    stack.callback(proc.wait, 20)
    stack.callback(proc.terminate)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            return f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def server_cpu(postmaster: int | None) -> float:
    """CPU seconds of the PostgreSQL server's processes (the postmaster's children)."""
    if postmaster is None:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def find_postmaster(url: str) -> int | None:
    if not url.startswith("postgresql"):
        return None
    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as conn:
        data_dir = conn.exec_driver_sql("SHOW data_directory").scalar_one()
    engine.dispose()
    return int((Path(data_dir) / "postmaster.pid").read_text().split()[0])


def database_url(stack: ExitStack, tmp: Path, kind: str) -> str:
    if kind == "postgres":
        from scripts.pgtest import running_postgres

        return stack.enter_context(running_postgres())
    return f"sqlite:///{tmp / 'dispatcher.db'}"


class InProcess:
    """A runtime of our own for an in-process bench: a real Redis and database, no Celery."""

    def __init__(self, stack: ExitStack, args: argparse.Namespace, *, receipt_delay: float) -> None:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dispatcher-bench-")))
        self.settings = Settings(
            var_dir=str(tmp / "var"),
            database_url=database_url(stack, tmp, args.database),
            redis_url=start_redis(stack, tmp),
            provider="simulator",
            simulator={"latency_ms": 0, "receipt_delay": receipt_delay},
            default_account_rate=0,
            min_send_at_lead=0,
            chunk_size=args.chunk_size,
        )
        upgrade(self.settings)
        self.postmaster = find_postmaster(self.settings.database_url)
        self.publisher = Collect()
        self.rt = Runtime(self.settings, self.publisher)
        stack.callback(self.rt.dispose)

    def write_batches(self, args: argparse.Namespace) -> list[str]:
        """``args.recipients`` recipients in batches due now, written by the intake service."""
        with transaction(self.rt.sessions) as session:
            account = accounts.create_account(session=session, name="bench")
        batch_ids = []
        for b in range(args.recipients // args.batch_size):
            with transaction(self.rt.sessions) as session:
                new = batches.NewBatch(
                    sender="Bench",
                    body="hello",
                    destinations=[f"+4477{b:04d}{i:05d}" for i in range(args.batch_size)],
                    channels=["sms"],
                    send_at=utcnow() - timedelta(seconds=1),
                    callback_url=args.callback_url,
                )
                intake = batches.create_batch(
                    session=session, settings=self.settings, account=account, new=new
                )
                batch_ids.append(intake.batch.id)
        return batch_ids

    def send(self, batch_id: str, timed: Callable[[str, Callable[[], Any]], Any]) -> None:
        """Fan the batch out, then send every chunk, each part through ``timed(part, call)``."""
        rt, settings = self.rt, self.settings
        self.publisher.messages.clear()

        def fan_out() -> int:
            with transaction(rt.sessions) as session:
                return scheduling.dispatch_batch(
                    session=session, settings=settings, batch_id=batch_id, now=utcnow()
                )

        timed("dispatch", fan_out)
        chunks = [m for m in self.publisher.messages if m.task is TaskName.SEND_CHUNK]
        for m in chunks:
            timed(
                "send",
                partial(
                    sending.send_recipients,
                    factory=rt.sessions,
                    settings=settings,
                    providers=rt.providers,
                    limiter=rt.limiter,
                    batch_id=m.kwargs["batch_id"],
                    seq_range=(m.kwargs["start"], m.kwargs["end"]),
                ),
            )

    def statuses(self) -> tuple[dict[str, int], int]:
        """Recipients by status, and how many status events there are."""
        with read_transaction(self.rt.sessions) as session:
            counted = select(Recipient.status, func.count()).group_by(Recipient.status)
            statuses = {str(status): n for status, n in session.execute(counted).all()}
            events = session.scalar(select(func.count()).select_from(StatusEvent)) or 0
        return statuses, events


def run(args: argparse.Namespace) -> dict[str, Any]:
    with ExitStack() as stack:
        bench = InProcess(stack, args, receipt_delay=3600)
        postmaster = bench.postmaster
        batch_ids = bench.write_batches(args)
        total = len(batch_ids) * args.batch_size
        settle_gc()  # as a worker process does when it starts
        profile = cProfile.Profile(time.process_time) if args.profile else None
        cpu = {"dispatch": 0.0, "send": 0.0}
        wall = {"dispatch": 0.0, "send": 0.0}
        server = {"dispatch": 0.0, "send": 0.0}

        def timed(part: str, call: Any) -> Any:
            d = server_cpu(postmaster)
            c, w = time.process_time(), time.perf_counter()
            if profile is not None:
                profile.enable()
            try:
                return call()
            finally:
                if profile is not None:
                    profile.disable()
                cpu[part] += time.process_time() - c
                wall[part] += time.perf_counter() - w
                server[part] += server_cpu(postmaster) - d

        for batch_id in batch_ids:
            bench.send(batch_id, timed)
        statuses, events = bench.statuses()
        if profile is not None:
            profile.dump_stats(args.profile)
        return {
            "metric": "send_path_cpu",
            "date": utcnow().isoformat(timespec="seconds") + "Z",
            "loadavg": list(os.getloadavg()),
            "machine": machine(),
            "params": vars(args),
            "recipients": total,
            "dispatch_cpu_ms_per_recipient": round(1000 * cpu["dispatch"] / total, 4),
            "send_cpu_ms_per_recipient": round(1000 * cpu["send"] / total, 4),
            "cpu_ms_per_recipient": round(1000 * sum(cpu.values()) / total, 4),
            "wall_s": {k: round(v, 2) for k, v in wall.items()},
            # PostgreSQL only: its server processes' CPU (clock ticks: coarse on small runs).
            "database_cpu_ms_per_recipient": {
                k: round(1000 * v / total, 4) for k, v in server.items()
            },
            "statuses": statuses,
            "status_events_per_recipient": round(events / total, 3),
        }


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """The options of the in-process benches (this one and bench.receipts)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--recipients", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--chunk-size", type=int, default=Settings.chunk_size)
    p.add_argument("--callback-url", default=None, help="give the batches a callback URL")
    p.add_argument("--profile", default=None, help="write a cProfile of the timed parts here")
    return p


def main() -> None:
    print(json.dumps(run(arguments(__doc__).parse_args())), flush=True)


if __name__ == "__main__":
    main()
