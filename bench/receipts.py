"""CPU per receipt of applying the simulator's delivery receipts, in one process.

    python -m bench.receipts [--database postgres] [--recipients 20000] [--profile out.prof]

Like ``bench.sendpath`` (no Celery, no API): the batches are written by the
intake service and sent by the two task bodies (untimed), with receipts due at
once; then the ``simulator_receipts`` task body (pop the due receipts from
Redis, apply them) runs until none is left, timed with ``time.process_time``,
and one ``sweep_receipts``. With PostgreSQL the server's own CPU is given apart
(``database_cpu_ms_per_receipt``). One JSON line on stdout.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import tempfile
import time
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from bench.harness import machine
from bench.sendpath import Collect, database_url, find_postmaster, server_cpu, start_redis
from dispatcher.accounts import service as accounts
from dispatcher.batches import service as batches
from dispatcher.batches.models import Recipient, StatusEvent
from dispatcher.config import Settings
from dispatcher.db import read_transaction, transaction, utcnow
from dispatcher.engine import scheduling, sending
from dispatcher.migrate import upgrade
from dispatcher.outbox import TaskName
from dispatcher.receipts import service as receipts
from dispatcher.runtime import Runtime


def send_all(rt: Runtime, publisher: Collect, args: argparse.Namespace) -> int:
    """Write and send ``args.recipients`` recipients (untimed); returns how many."""
    settings = rt.settings
    with transaction(rt.sessions) as session:
        account = accounts.create_account(session=session, name="bench")
    total = 0
    for b in range(args.recipients // args.batch_size):
        with transaction(rt.sessions) as session:
            new = batches.NewBatch(
                sender="Bench",
                body="hello",
                destinations=[f"+4477{b:04d}{i:05d}" for i in range(args.batch_size)],
                channels=["sms"],
                send_at=utcnow() - timedelta(seconds=1),
                callback_url=args.callback_url,
            )
            batch_id = batches.create_batch(
                session=session, settings=settings, account=account, new=new
            ).batch.id
        publisher.messages.clear()
        with transaction(rt.sessions) as session:
            scheduling.dispatch_batch(
                session=session, settings=settings, batch_id=batch_id, now=utcnow()
            )
        for m in [m for m in publisher.messages if m.task is TaskName.SEND_CHUNK]:
            sending.send_recipients(
                factory=rt.sessions,
                settings=settings,
                providers=rt.providers,
                limiter=rt.limiter,
                batch_id=m.kwargs["batch_id"],
                seq_range=(m.kwargs["start"], m.kwargs["end"]),
            )
        total += args.batch_size
    return total


def run(args: argparse.Namespace) -> dict[str, Any]:
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dispatcher-receipts-")))
        settings = Settings(
            var_dir=str(tmp / "var"),
            database_url=database_url(stack, tmp, args.database),
            redis_url=start_redis(stack, tmp),
            provider="simulator",
            simulator={"latency_ms": 0, "receipt_delay": 0},
            default_account_rate=0,
            min_send_at_lead=0,
            chunk_size=args.chunk_size,
        )
        upgrade(settings)
        postmaster = find_postmaster(settings.database_url)
        publisher = Collect()
        rt = Runtime(settings, publisher)
        stack.callback(rt.dispose)
        total = send_all(rt, publisher, args)
        simulator = next(p for p in rt.providers.values() if p.name == "simulator")
        profile = cProfile.Profile() if args.profile else None
        server0, cpu0, wall0 = server_cpu(postmaster), time.process_time(), time.perf_counter()
        if profile is not None:
            profile.enable()
        accepted: dict[str, int] = {}
        tasks = 0
        while due := simulator.due_receipts():  # type: ignore[attr-defined]
            tasks += 1
            with transaction(rt.sessions) as session:
                counts = receipts.accept(
                    session=session, provider=simulator.name, receipts=due, now=utcnow()
                ).as_dict()
            for k, v in counts.items():
                accepted[k] = accepted.get(k, 0) + v
        with transaction(rt.sessions) as session:
            receipts.sweep(session=session, settings=settings, now=utcnow())
        if profile is not None:
            profile.disable()
            profile.dump_stats(args.profile)
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - wall0
        server = server_cpu(postmaster) - server0
        with read_transaction(rt.sessions) as session:
            counted = select(Recipient.status, func.count()).group_by(Recipient.status)
            statuses = {str(status): n for status, n in session.execute(counted).all()}
            events = session.scalar(select(func.count()).select_from(StatusEvent)) or 0
        return {
            "metric": "receipt_cpu",
            "date": utcnow().isoformat(timespec="seconds") + "Z",
            "loadavg": list(os.getloadavg()),
            "machine": machine(),
            "params": vars(args),
            "recipients": total,
            "tasks": tasks,
            "accepted": accepted,
            "cpu_ms_per_receipt": round(1000 * cpu / total, 4),
            "wall_s": round(wall, 2),
            # PostgreSQL only: its server processes' CPU (clock ticks: coarse on small runs).
            "database_cpu_ms_per_receipt": round(1000 * server / total, 4),
            "statuses": statuses,
            "status_events_per_recipient": round(events / total, 3),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--recipients", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--chunk-size", type=int, default=500)
    p.add_argument("--callback-url", default=None, help="give the batches a callback URL")
    p.add_argument("--profile", default=None, help="write a cProfile of the timed part here")
    print(json.dumps(run(p.parse_args())), flush=True)


if __name__ == "__main__":
    main()
