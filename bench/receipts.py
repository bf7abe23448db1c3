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
import time
from contextlib import ExitStack
from typing import Any

from bench.harness import machine
from bench.sendpath import InProcess, arguments, server_cpu
from dispatcher.db import transaction, utcnow
from dispatcher.receipts import service as receipts


def run(args: argparse.Namespace) -> dict[str, Any]:
    with ExitStack() as stack:
        bench = InProcess(stack, args, receipt_delay=0)
        rt, settings, postmaster = bench.rt, bench.settings, bench.postmaster
        batch_ids = bench.write_batches(args)
        for batch_id in batch_ids:
            bench.send(batch_id, lambda _part, call: call())  # untimed
        total = len(batch_ids) * args.batch_size
        simulator = next(p for p in rt.providers.values() if p.name == "simulator")
        profile = cProfile.Profile(time.process_time) if args.profile else None
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
        statuses, events = bench.statuses()
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
    print(json.dumps(run(arguments(__doc__).parse_args())), flush=True)


if __name__ == "__main__":
    main()
