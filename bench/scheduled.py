"""Scheduled mode: a large backlog beyond the horizon costs nothing until it is due.

Phase 1 posts ``--recipients`` (1,000,000) with ``send_at`` a day ahead and
reports Redis memory before and after intake (nothing beyond the horizon may be
in Redis), worker RSS over the phase, and the database size. Phase 2 posts
``--due-recipients`` (100,000) with ``send_at`` ``--send-ahead`` seconds ahead
(beyond the end of their intake) and reports how late they are handed off
relative to ``send_at`` (``sent_at - send_at``: first, p50, p99, last).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import redis

from bench.harness import BenchError, Out, System, log, parse_ts, percentile, wait_all_sent
from bench.intake import Intake, batch_sizes
from bench.sampler import ProcSampler


def redis_used_bytes(system: System) -> int:
    client = redis.Redis.from_url(system.redis_url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


def iso(moment: dt.datetime) -> str:
    return moment.replace(microsecond=0).isoformat() + "Z"


def scheduled_mode(system: System, out: Out) -> None:
    args = system.args
    system.start_sending_system()

    # Phase 1: the far backlog.
    sampler = ProcSampler(system.sampled)
    sampler.start()
    redis_before = redis_used_bytes(system)
    far = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(days=1)
    sizes = batch_sizes(args.recipients, args.batch_size)
    intake = Intake(system, batches=sizes, threads=args.intake_threads, send_at=iso(far))
    log(f"scheduled: {args.recipients} recipients a day ahead, {len(sizes)} batches")
    intake.run()
    intake_s = intake.finished - intake.started
    # A few scheduler ticks after intake: nothing may be promoted, nothing may grow.
    time.sleep(5)
    redis_after = redis_used_bytes(system)
    sampler.finish()
    statuses = system.status_counts()
    out.emit(
        "scheduled_backlog",
        recipients=intake.accepted,
        intake_recipients_per_s=round(intake.accepted / intake_s, 1),
        redis_used_mb_before=round(redis_before / 2**20, 2),
        redis_used_mb_after=round(redis_after / 2**20, 2),
        redis_increase_mb=round((redis_after - redis_before) / 2**20, 2),
        statuses=statuses,
        worker_rss_total=sampler.rss_over_time(),
        database_bytes=system.database_bytes(),
        database_bytes_per_recipient=round(
            (system.database_bytes() - system.empty_bytes) / max(intake.accepted, 1), 1
        ),
        what="Redis used_memory before/after posting a day-ahead backlog; summed worker RSS",
    )
    if set(statuses) != {"scheduled"}:
        raise BenchError(f"a day-ahead backlog left the database: {statuses}")

    # Phase 2: a due backlog, all at one send_at shortly after its intake ends.
    due_n = args.due_recipients
    due_sizes = batch_sizes(due_n, args.batch_size)
    send_at = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0) + dt.timedelta(
        seconds=args.send_ahead
    )
    sampler = ProcSampler(system.sampled)
    sampler.start()
    due = Intake(
        system,
        batches=due_sizes,
        threads=args.intake_threads,
        send_at=iso(send_at),
        first_batch=len(sizes),
    )
    log(f"due backlog: {due_n} recipients at {send_at:%H:%M:%S} ({args.send_ahead:.0f}s ahead)")
    due.run()
    ended = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    if ended >= send_at:
        late = (ended - send_at).total_seconds()
        log(f"warning: intake of the due backlog ended {late:.1f}s after send_at")
    wait_all_sent(system, due_n, "due backlog")
    sampler.finish()
    rows = system.query(
        "SELECT r.sent_at, b.send_at FROM recipients r JOIN batches b ON b.id = r.batch_id"
        " WHERE r.sent_at IS NOT NULL"
    )
    lateness = sorted((parse_ts(s) - parse_ts(a)).total_seconds() for s, a in rows)
    if len(lateness) != due_n:
        raise BenchError(f"{len(lateness)} recipients sent, expected {due_n}")
    result: dict[str, Any] = {
        "recipients": due_n,
        "send_ahead_s": args.send_ahead,
        "intake_ended_before_send_at_s": round((send_at - ended).total_seconds(), 1),
        "first_s": round(lateness[0], 3),
        "p50_s": round(percentile(lateness, 50) or 0, 3),
        "p99_s": round(percentile(lateness, 99) or 0, 3),
        "last_s": round(lateness[-1], 3),
        "span_recipients_per_s": round(due_n / max(lateness[-1] - lateness[0], 1e-9), 1),
        "what": "sent_at - send_at per recipient of the due backlog",
    }
    out.emit("due_backlog_lateness", **result)
    out.emit("resources", **sampler.result(due_n), worker_rss_total=sampler.rss_over_time())
    log(
        f"due backlog: first {lateness[0]:.2f}s, p50 {result['p50_s']}s, p99 {result['p99_s']}s,"
        f" last {lateness[-1]:.2f}s late"
    )
