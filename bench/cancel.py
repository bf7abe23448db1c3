"""Cancel mode: DELETE latency while a large load is sending, and the provider's proof.

``--recipients`` (100,000) are posted to send at once; while they send,
``--cancel-batches`` (20) more 1,000-recipient batches are posted and cancelled
(``DELETE /batch/<id>``) one after another. Reported: DELETE latency p50/p99/max,
recipients cancelled, and from the simulator's ledger (every hand-off, per
recipient and channel) how many recipients counted as cancelled were handed off
anyway: it must be 0.
"""

from __future__ import annotations

import threading
import time

import redis
import requests

from bench.harness import BenchError, Out, System, log, percentile, wait_all_sent
from bench.intake import Intake, batch_sizes, numbers
from bench.sampler import ProcSampler
from dispatcher.channels.simulator import HANDOFFS


def cancel_mode(system: System, out: Out) -> None:
    args = system.args
    system.start_sending_system()

    sampler = ProcSampler(system.sampled)
    sampler.start()
    sizes = batch_sizes(args.recipients, args.batch_size)
    load = Intake(system, batches=sizes, threads=args.intake_threads)
    loader = threading.Thread(target=load.run, name="load", daemon=True)
    log(f"cancel: {args.recipients} recipients sending, {args.cancel_batches} batches cancelled")
    loader.start()
    # Let the load get going, so every cancel competes with intake and sending.
    time.sleep(1.0)

    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {system.api_key}"
    latencies: list[float] = []
    cancelled = 0
    posted = 0
    for k in range(args.cancel_batches):
        body = {
            "from": "Dispatcher",
            "message": "Benchmark message (cancelled)",
            "destinations": numbers(len(sizes) + k, 1000),
        }
        reply = http.post(system.api_base + "/batch?allowMulti=true", json=body, timeout=120)
        if reply.status_code != 200:
            raise BenchError(f"cancel batch {k}: {reply.status_code} {reply.text[:300]}")
        posted += 1000
        batch_id = reply.json()["identifier"]
        t0 = time.monotonic()
        reply = http.delete(f"{system.api_base}/batch/{batch_id}", timeout=120)
        latencies.append(time.monotonic() - t0)
        if reply.status_code != 200:
            raise BenchError(f"DELETE {batch_id}: {reply.status_code} {reply.text[:300]}")
        cancelled += int(reply.json()["cancelledCount"])
        time.sleep(args.cancel_interval)
    http.close()
    loader.join()
    if load.errors:
        raise BenchError("load intake failed: " + "; ".join(load.errors[:3]))
    wait_all_sent(system, load.accepted + posted, "cancel")
    sampler.finish()

    ids = {r[0] for r in system.query("SELECT id FROM recipients WHERE status = 'cancelled'")}
    client = redis.Redis.from_url(system.redis_url)
    try:
        keys = [k.decode() if isinstance(k, bytes) else k for k in client.hkeys(HANDOFFS)]
        handed = {k.split(":", 1)[0] for k in keys}
    finally:
        client.close()
    leaked = len(ids & handed)
    latencies.sort()
    out.emit(
        "cancel_under_load",
        delete_p50_s=round(percentile(latencies, 50) or 0, 4),
        delete_p99_s=round(percentile(latencies, 99) or 0, 4),
        delete_max_s=round(latencies[-1], 4),
        deletes=len(latencies),
        batch_recipients=1000,
        load_recipients=load.accepted,
        cancelled_reported=cancelled,
        cancelled_in_database=len(ids),
        handed_off_total=len(handed),
        cancelled_but_handed_off=leaked,
        statuses=system.status_counts(),
        log_errors=system.log_errors(),
    )
    out.emit("resources", **sampler.result(load.accepted + posted))
    log(
        f"cancel: DELETE p50 {percentile(latencies, 50):.3f}s p99 {percentile(latencies, 99):.3f}s;"
        f" {cancelled} cancelled, {leaked} of them handed off"
    )
    if leaked or cancelled != len(ids):
        raise BenchError(
            f"{leaked} cancelled recipients were handed off; {cancelled} reported cancelled,"
            f" {len(ids)} in the database"
        )
