"""Rate mode: how closely several worker processes together keep an account's rate."""

from __future__ import annotations

import datetime as dt
import time

from bench.harness import BenchError, Out, System, log, sent_rows, wait_all_sent
from bench.intake import Intake, batch_sizes
from bench.sampler import ProcSampler


def rate_mode(system: System, out: Out) -> None:
    args = system.args
    rate = args.rate
    system.start_redis()
    system.configure()
    system.migrate_and_account(rate=rate)
    api = system.start_api(args.api_workers)
    system.start_send_workers()
    beat = system.start_beat()
    system.wait_ready([*system.workers(), beat, api])
    time.sleep(2)

    total = args.recipients
    sizes = batch_sizes(total, args.batch_size)
    sampler = ProcSampler(system.sampled)
    sampler.start()
    intake = Intake(system, batches=sizes, threads=args.intake_threads)
    log(f"rate: {total} recipients at {rate}/s (~{total / rate:.0f}s) on {len(sizes)} batches")
    intake.run()
    wait_all_sent(system, intake.accepted, "rate")
    sampler.finish()

    times = sorted(s for s, _ in sent_rows(system))
    t0, t1 = times[0], times[-1]
    span = (t1 - t0).total_seconds()
    # Steady window: leave out the ramp-up and the tail (10% of the span each, at least 2 s).
    trim = max(2.0, 0.1 * span)
    lo, hi = t0 + dt.timedelta(seconds=trim), t1 - dt.timedelta(seconds=trim)
    window = (hi - lo).total_seconds()
    if window <= 0:
        raise BenchError(f"run too short for a steady window (span {span:.1f}s)")
    in_window = sum(1 for t in times if lo <= t < hi)
    achieved = in_window / window
    overall = (len(times) - 1) / span if span > 0 else None
    # Worst one-second bucket inside the window (bursts the limiter let through).
    buckets: dict[int, int] = {}
    for t in times:
        if lo <= t < hi:
            key = int((t - lo).total_seconds())
            buckets[key] = buckets.get(key, 0) + 1
    full = [buckets.get(k, 0) for k in range(int(window))]
    out.emit(
        "rate_limit_accuracy",
        configured=rate,
        achieved=round(achieved, 2),
        error_pct=round((achieved - rate) / rate * 100, 2),
        overall=round(overall, 2) if overall else None,
        window_s=round(window, 2),
        span_s=round(span, 2),
        sent=len(times),
        max_per_1s=max(full) if full else None,
        min_per_1s=min(full) if full else None,
        worker_processes=args.worker_processes,
        chunks_by_worker={c.name: c.output().count("send_chunk[") // 2 for c in system.workers()},
        log_errors=system.log_errors(),
    )
    out.emit("resources", **sampler.result(intake.accepted))
    log(f"rate: configured {rate}/s, achieved {achieved:.2f}/s over a {window:.1f}s window")
