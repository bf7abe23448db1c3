"""Soak: a mixed load on PostgreSQL with several send processes; what deadlocks and waits.

    python -m bench.soak [--duration 120] [--worker-processes 3] [--keep]

A throw-away PostgreSQL (scripts/pgtest.py) with ``log_lock_waits`` on and a short
``deadlock_timeout``; Redis, the API, the dispatch worker, ``--worker-processes`` send
workers, beat, the callback worker and bench/sink.py; sweeps, leases and stalls made
short so reclaim, stall release, promote and expiry all run often. For ``--duration``
seconds, client threads post, each on an account of its own:

- ``now``: batches sent at once (unlimited account);
- ``later``: batches with ``send_at`` a few seconds ahead (a throttled account);
- ``expiring``: Sinch batches with ``send_at`` and ``expire_at`` seconds ahead on a
  throttled account, so that expiry meets sending;
- ``cancel``: batches cancelled while they send;
- ``rcs``: rcs batches falling back to sms (the simulator finds a share of the numbers
  not rcs capable; some sms tries fail once, some numbers are invalid, some receipts fail).

Every ``--pause-every`` seconds one send pool process is stopped (SIGSTOP) for longer than
the lease and then let go on: reclaim takes its claims, and its record comes late.

Then it waits (``--timeout``) until every recipient is final and every callback
delivered, and prints one JSON line, ``soak``: statuses, deadlocks and lock waits from
the server's log (with their statements), ERROR lines of every process, double
hand-offs from the simulator's ledger, recipients not final, batches not ended,
cancelled recipients handed off.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import random
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import requests

from bench.harness import BenchError, Out, System, log, run_system
from bench.intake import CallbackSink
from bench.sampler import group_pids, parent_pid
from dispatcher.channels.simulator import HANDOFFS, LEDGER
from dispatcher.config import Settings
from dispatcher.states import FINAL_RECIPIENT, OPEN_BATCH

# Numbers are +447 and nine digits; the simulator's rules pick them by their last digits.
TRANSIENT_SMS = r"5[05]$"  # the first sms try fails (busy): retried
SIMULATOR_RULES: dict[str, Any] = {
    "unreachable": {"rcs": [r"[0-3]$"]},  # 40%: not rcs capable, sms instead
    "invalid": [r"999$"],
    "transient": {"sms": {"pattern": TRANSIENT_SMS, "times": 1}},
    "undeliverable": [r"77$"],  # accepted, then a failed receipt
}
# Short leases, stalls and sweeps: reclaim, stall release and promote run often.
SOAK_SETTINGS: dict[str, Any] = {
    "scheduler_interval": 0.5,
    "send_lease": 6.0,
    "stall_after": 4.0,
    # Above the soak's deferrals (a deferred row keeps its task until its turn): lower, the
    # sweep publishes it again and again, and each copy books rate tokens it cannot use.
    "requeue_after": 60.0,
    "receipt_retention": 60.0,
    "send_retry_schedule": (1.0, 2.0, 3.0),
    "callback_retry_schedule": (1.0, 2.0, 5.0),
    # Above the callbacks' lag under this load: lower, promote_callbacks publishes every
    # pending callback again and again (5,000 a run), and the backlog feeds itself.
    "callback_requeue_after": 30.0,
    "callback_allowlist": ("127.0.0.1",),
}
# A statement in a server log entry, shortened for the report.
STATEMENT_CHARS = 400


def iso(at: dt.datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Load:
    """The client threads: each posts its kind of batch on its own account until the end."""

    def __init__(self, system: System, *, until: float, seed: int) -> None:
        self.system = system
        self.until = until
        self.lock = threading.Lock()
        self.next_number = 0
        self.posted: Counter[str] = Counter()
        self.recipients = 0
        self.cancels: Counter[str] = Counter()
        self.errors: list[str] = []
        self.keys: dict[str, tuple[str, str]] = {}
        self.rng = random.Random(seed)

    def numbers(self, count: int) -> list[str]:
        with self.lock:
            first, self.next_number = self.next_number, self.next_number + count
        return [f"+447{n:09d}" for n in range(first, first + count)]

    def session(self, kind: str) -> requests.Session:
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {self.keys[kind][1]}"
        return http

    def post(self, http: requests.Session, kind: str, url: str, body: dict[str, Any]) -> str:
        reply = http.post(url, json=body, timeout=60)
        if reply.status_code not in (200, 201):
            raise BenchError(f"{kind}: {reply.status_code} {reply.text[:300]}")
        data = reply.json()
        with self.lock:
            self.posted[kind] += 1
            self.recipients += len(body.get("destinations") or body.get("to") or [])
        return str(data.get("identifier") or data.get("id"))

    def mplus(self, kind: str, size: int, **extra: Any) -> tuple[requests.Session, str]:
        http = self.session(kind)
        body = {
            "from": "Dispatcher",
            "message": f"Soak {kind}",
            "destinations": self.numbers(size),
            "callback": self.system.callback_url,
            **extra,
        }
        return http, self.post(http, kind, self.system.api_base + "/batch?allowMulti=true", body)

    # -- the kinds of load (each returns after posting one batch)

    def now(self) -> None:
        self.mplus("now", 50)[0].close()

    def later(self) -> None:
        at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.rng.uniform(1, 4))
        self.mplus("later", 30, send_at=iso(at))[0].close()

    def expiring(self) -> None:
        now = dt.datetime.now(dt.UTC)
        send_at = now + dt.timedelta(seconds=self.rng.uniform(0.5, 3))
        expire_at = send_at + dt.timedelta(seconds=self.rng.uniform(0.5, 4))
        account = self.keys["expiring"][0]
        http = self.session("expiring")
        body = {
            "from": "Dispatcher",
            "to": self.numbers(40),
            "body": "Soak expiring",
            "send_at": iso(send_at),
            "expire_at": iso(expire_at),
            "delivery_report": "per_recipient",
            "callback_url": self.system.callback_url,
        }
        self.post(http, "expiring", f"{self.system.api_base}/xms/v1/{account}/batches", body)
        http.close()

    def cancel(self) -> None:
        http, batch_id = self.mplus("cancel", 60)
        time.sleep(self.rng.uniform(0.3, 3.0))
        reply = http.delete(f"{self.system.api_base}/batch/{batch_id}", timeout=60)
        http.close()
        if reply.status_code == 200:
            outcome = "cancelled"
        elif reply.status_code == 409:
            outcome = "already_ended"  # every recipient was sent before the DELETE
        else:
            raise BenchError(f"cancel {batch_id}: {reply.status_code} {reply.text[:300]}")
        with self.lock:
            self.cancels[outcome] += 1

    def rcs(self) -> None:
        self.mplus("rcs", 40, channel="rcs", fallback_channels=["sms"])[0].close()

    def loop(self, kind: str, work: Callable[[], None], every: float) -> None:
        while time.monotonic() < self.until:
            started = time.monotonic()
            try:
                work()
            except (BenchError, requests.RequestException) as exc:
                with self.lock:
                    self.errors.append(f"{kind}: {exc}")
                return
            time.sleep(max(0.0, every - (time.monotonic() - started)))

    def run(self) -> None:
        kinds: list[tuple[str, Callable[[], None], float]] = [
            ("now", self.now, 1.5),
            ("later", self.later, 2.0),
            ("expiring", self.expiring, 2.0),
            ("cancel", self.cancel, 1.5),
            ("rcs", self.rcs, 2.0),
        ]
        threads = [
            threading.Thread(target=self.loop, args=k, name=f"load-{k[0]}", daemon=True)
            for k in kinds
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


# --------------------------------------------------------------------------- the server log

ENTRY = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \w+ \[(\d+)\] (\w+):\s+(.*)$")
WAITING = re.compile(r"process (\d+) still waiting for (.+?) after ([\d.]+) ms")
ACQUIRED = re.compile(r"process (\d+) acquired (.+?) after ([\d.]+) ms")
DEADLOCK_PROCESS = re.compile(r"^Process (\d+): (.*)$")


def short(sql: str) -> str:
    one = " ".join(sql.split())
    return one if len(one) <= STATEMENT_CHARS else one[:STATEMENT_CHARS] + "..."


def log_entries(text: str) -> list[dict[str, Any]]:
    """The server log as entries: pid, level, message, and DETAIL / STATEMENT if any."""
    entries: list[dict[str, Any]] = []
    for line in text.splitlines():
        m = ENTRY.match(line)
        if m:
            pid, level, message = m.groups()
            if level in ("DETAIL", "STATEMENT", "HINT", "CONTEXT") and entries:
                entries[-1].setdefault(level, []).append(message)
            else:
                entries.append({"pid": pid, "level": level, "message": message})
        elif entries:
            # A continuation line (a multi-line statement or detail).
            entry = entries[-1]
            key = next((k for k in ("STATEMENT", "DETAIL") if k in entry), None)
            if key:
                entry[key][-1] += "\n" + line.strip()
            else:
                entry["message"] += "\n" + line.strip()
    return entries


def locks_report(text: str, *, long_wait_ms: float) -> dict[str, Any]:
    """Deadlocks (both statements), lock waits over ``long_wait_ms``, other ERROR lines."""
    deadlocks: list[dict[str, Any]] = []
    long_waits: list[dict[str, Any]] = []
    errors: Counter[str] = Counter()
    waiting: dict[str, dict[str, Any]] = {}
    waits = 0
    waited_in: Counter[str] = Counter()
    for e in log_entries(text):
        message, statement = e["message"], "\n".join(e.get("STATEMENT", []))
        if e["level"] == "ERROR" and message.startswith("deadlock detected"):
            detail = "\n".join(e.get("DETAIL", []))
            statements = {
                m.group(1): short(m.group(2))
                for line in detail.splitlines()
                if (m := DEADLOCK_PROCESS.match(line.strip()))
            }
            deadlocks.append(
                {
                    "victim": short(statement),
                    "statements": statements,
                    "detail": [ln.strip() for ln in detail.splitlines() if "waits for" in ln],
                }
            )
        elif e["level"] in ("ERROR", "FATAL", "PANIC"):
            errors[short(message)] += 1
        elif m := WAITING.search(message):
            waits += 1
            waited_in[short(statement)[:160]] += 1
            waiting[m.group(1)] = {
                "lock": m.group(2),
                "statement": short(statement),
                "holder": "\n".join(e.get("DETAIL", [])),
            }
        elif (m := ACQUIRED.search(message)) and float(m.group(3)) >= long_wait_ms:
            start = waiting.get(m.group(1), {})
            long_waits.append({"ms": round(float(m.group(3))), **start})
    # The same pair of statements, however often: one row with a count.
    pairs: Counter[str] = Counter(" || ".join(sorted(d["statements"].values())) for d in deadlocks)
    return {
        "deadlocks": len(deadlocks),
        "deadlock_pairs": [{"count": n, "statements": p.split(" || ")} for p, n in pairs.items()],
        "deadlock_examples": deadlocks[:5],
        "lock_waits_logged": waits,
        "lock_waits_by_statement": dict(waited_in.most_common(8)),
        "lock_waits_over_1s": len(long_waits),
        "long_waits": sorted(long_waits, key=lambda w: -w["ms"])[:10],
        "server_errors": dict(errors.most_common(20)),
    }


class Pauser:
    """Every ``every`` seconds, stops one send worker's pool process (SIGSTOP) for longer
    than the send lease, then lets it go on (SIGCONT): its claims are reclaimed meanwhile
    (the provider asked), and its record comes late, as a slow or stuck worker's does.
    Only the bench's own processes, by pid."""

    def __init__(self, system: System, *, every: float, pause: float, seed: int) -> None:
        self.system = system
        self.every = every
        self.pause = pause
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.paused = 0
        self.thread = threading.Thread(target=self._run, name="pauser", daemon=True)

    def _pool(self) -> list[int]:
        pids = []
        for child in self.system.workers():
            if child.name.startswith("send"):
                pids += [p for p in group_pids({child.pid}) if parent_pid(p) == child.pid]
        return pids

    def _in_hand_off(self, pool: list[int]) -> list[int]:
        """Those sleeping in the simulator's per-message latency (or for rate tokens): a
        pool process waiting for its next task sleeps in a poll instead."""
        found = []
        for pid in pool:
            with contextlib.suppress(OSError):
                if "nanosleep" in Path(f"/proc/{pid}/wchan").read_text():
                    found.append(pid)
        return found

    def _pick(self) -> int | None:
        """A pool process in a hand-off if one is seen within 2 s, else any."""
        pool: list[int] = []
        for _ in range(40):
            pool = self._pool()
            busy = self._in_hand_off(pool)
            if busy:
                return self.rng.choice(busy)
            if self.stop.wait(0.05):
                return None
        return self.rng.choice(pool) if pool else None

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            pid = self._pick()
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGSTOP)
                self.paused += 1
                self.stop.wait(self.pause)
            except ProcessLookupError:
                continue
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def start(self) -> None:
        if self.every > 0:
            self.thread.start()

    def finish(self) -> int:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=self.pause + 10)
        return self.paused


class LockWatch:
    """Polls pg_stat_activity: every wait for a lock, with who holds it (their process by
    application_name, their statement or last one, their transaction's age), longest per
    pair of statements. The server log names the holder's pid only."""

    SQL = """
        SELECT w.application_name, w.query, extract(epoch FROM now() - w.query_start),
               b.application_name, b.state, b.query, extract(epoch FROM now() - b.xact_start)
        FROM pg_stat_activity w
        JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS holder(pid) ON true
        JOIN pg_stat_activity b ON b.pid = holder.pid
        WHERE w.wait_event_type = 'Lock'
    """

    def __init__(self, system: System, *, every: float = 0.2) -> None:
        self.system = system
        self.every = every
        self.stop = threading.Event()
        self.longest: dict[tuple[str, ...], dict[str, Any]] = {}
        self.thread = threading.Thread(target=self._run, name="lock-watch", daemon=True)

    def _run(self) -> None:
        with self.system.db() as conn:
            while not self.stop.wait(self.every):
                for w_app, w_sql, waited, h_app, h_state, h_sql, h_age in conn.exec_driver_sql(
                    self.SQL
                ).all():
                    key = (w_app, short(w_sql), h_app, short(h_sql))
                    seen = self.longest.setdefault(key, {"waited_s": 0.0, "seen": 0})
                    seen["seen"] += 1
                    if float(waited or 0) > seen["waited_s"]:
                        seen.update(
                            waited_s=round(float(waited or 0), 2),
                            holder_state=h_state,
                            holder_transaction_s=round(float(h_age or 0), 2),
                        )
                conn.rollback()

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> list[dict[str, Any]]:
        """The pairs seen waiting, longest first."""
        self.stop.set()
        self.thread.join(timeout=10)
        rows = [
            {"waiter": w, "waiter_sql": ws, "holder": h, "holder_sql": hs, **seen}
            for (w, ws, h, hs), seen in self.longest.items()
        ]
        return sorted(rows, key=lambda r: -r["waited_s"])


# --------------------------------------------------------------------------- the run


NOT_FINAL = "SELECT count(*) FROM recipients WHERE status NOT IN ({})".format(
    ", ".join(f"'{s.value}'" for s in FINAL_RECIPIENT)
)
CALLBACKS_DUE = "SELECT count(*) FROM callbacks WHERE state IN ('pending', 'delivering')"


def wait_until_none(system: System, sql: str, what: str, deadline: float) -> int:
    """Poll ``sql`` (a count) until it is 0 or ``deadline`` passes; returns the last count."""
    last_log = time.monotonic()
    while True:
        left = int(system.query(sql)[0][0])
        if left == 0 or time.monotonic() > deadline:
            return left
        system.check_alive()
        if time.monotonic() - last_log > 5:
            log(f"soak: {left} {what}")
            last_log = time.monotonic()
        time.sleep(1.0)


def by_account(system: System) -> dict[str, Any]:
    """Per account: recipients by status, and the span and rate of its hand-offs."""
    rows = system.query(
        "SELECT a.name, r.status, count(*), min(r.sent_at), max(r.sent_at)"
        " FROM recipients r JOIN batches b ON b.id = r.batch_id"
        " JOIN accounts a ON a.id = b.account_id GROUP BY a.name, r.status"
    )
    found: dict[str, Any] = {}
    for name, status, n, first, last in rows:
        entry = found.setdefault(name, {"statuses": {}, "first": None, "last": None, "sent": 0})
        entry["statuses"][status] = int(n)
        if first is not None:
            entry["sent"] += int(n)
            entry["first"] = min(first, entry["first"] or first)
            entry["last"] = max(last, entry["last"] or last)
    for entry in found.values():
        first, last = entry.pop("first"), entry.pop("last")
        span = (last - first).total_seconds() if first and last else 0.0
        entry["sending_span_s"] = round(span, 1)
        entry["sent_per_s"] = round(entry["sent"] / span, 1) if span else None
    return found


def not_final_by(system: System) -> list[dict[str, Any]]:
    """The recipients not final, by account, status and what they wait for."""
    rows = system.query(
        "SELECT a.name, b.status, r.status, count(*),"
        " count(*) FILTER (WHERE r.enqueued_at IS NULL),"
        " min(r.next_attempt_at) - now() AT TIME ZONE 'UTC',"
        " max(r.next_attempt_at) - now() AT TIME ZONE 'UTC'"
        " FROM recipients r JOIN batches b ON b.id = r.batch_id"
        " JOIN accounts a ON a.id = b.account_id"
        " WHERE r.status NOT IN ({}) GROUP BY 1, 2, 3".format(
            ", ".join(f"'{s.value}'" for s in FINAL_RECIPIENT)
        )
    )
    return [
        {
            "account": name,
            "batch": batch,
            "status": status,
            "count": int(n),
            "not_enqueued": int(idle),
            "next_attempt_in_s": [
                None if t is None else round(t.total_seconds(), 1) for t in (lo, hi)
            ],
        }
        for name, batch, status, n, idle, lo, hi in rows
    ]


def double_handoffs(system: System) -> dict[str, Any]:
    """Hand-offs beyond what a recipient's channel may see: one, or one more than the
    transient rule's failures for its number (the simulator's ledger counts every try)."""
    client = redis.Redis.from_url(system.redis_url)
    try:
        counts = {
            (k.decode() if isinstance(k, bytes) else k): int(v)
            for k, v in client.hgetall(HANDOFFS).items()
        }
    finally:
        client.close()
    numbers = dict(system.query('SELECT id, "to" FROM recipients'))
    transient = re.compile(TRANSIENT_SMS)
    doubles = []
    for key, n in counts.items():
        recipient, channel = key.split(":", 1)
        allowed = 2 if channel == "sms" and transient.search(numbers.get(recipient, "")) else 1
        if n > allowed:
            doubles.append({"key": key, "handoffs": n})
    return {"handed_off_keys": len(counts), "doubles": len(doubles), "examples": doubles[:10]}


def soak(system: System, out: Out) -> None:
    args = system.args
    system.start_redis()
    system.start_database()
    system.pg_log_locks(args.deadlock_timeout_ms)
    system.configure(
        simulator={
            **SIMULATOR_RULES,
            "latency_ms": args.latency_ms,
            "receipt_delay": args.receipt_delay,
        },
        **SOAK_SETTINGS,
    )
    system.sink = CallbackSink(system)
    system.callback_url = system.sink.url
    system.migrate_and_account(rate=None)
    load = Load(system, until=0.0, seed=args.seed)
    rates = {"now": None, "later": 25.0, "expiring": 15.0, "cancel": None, "rcs": None}
    for kind, rate in rates.items():
        load.keys[kind] = system.add_account(f"soak-{kind}", rate)
    api = system.start_api(args.api_workers)
    system.start_send_workers()
    system.start_callback_worker(args.callback_concurrency)
    beat = system.start_beat()
    system.wait_ready([*system.workers(), beat, api])

    log(f"soak: {args.duration:.0f} s of mixed load")
    started = time.monotonic()
    load.until = started + args.duration
    watch = LockWatch(system)
    watch.start()
    pauser = Pauser(
        system,
        every=args.pause_every,
        # Past the lease by more than reclaim's period (5 s): a reclaim run meets the claim.
        pause=SOAK_SETTINGS["send_lease"] + 7,
        seed=args.seed,
    )
    pauser.start()
    load.run()
    paused = pauser.finish()
    if load.errors:
        raise BenchError("load failed: " + "; ".join(load.errors[:3]))
    log(f"soak: {load.recipients} recipients posted; waiting until every one is final")
    deadline = time.monotonic() + args.timeout
    not_final = wait_until_none(system, NOT_FINAL, "recipients not final yet", deadline)
    final_s = time.monotonic() - started
    callbacks_due = wait_until_none(system, CALLBACKS_DUE, "callbacks not delivered", deadline)
    drained_s = time.monotonic() - started
    # The last receipts' callbacks, and the sweeps' last runs.
    time.sleep(2.0)
    waits = watch.finish()

    cancelled = {r[0] for r in system.query("SELECT id FROM recipients WHERE status='cancelled'")}
    handoffs = double_handoffs(system)
    client = redis.Redis.from_url(system.redis_url)
    try:
        # Accepted by the simulator (a failed try is in HANDOFFS too, and not a send).
        handed = {
            (k.decode() if isinstance(k, bytes) else k).split(":", 1)[0]
            for k in client.hkeys(LEDGER)
        }
    finally:
        client.close()
    open_states = ", ".join(f"'{s.value}'" for s in OPEN_BATCH)
    batches_open = system.query(f"SELECT id, status FROM batches WHERE status IN ({open_states})")
    processes = system.error_lines()
    server_log = system.pg_log()
    out.emit(
        "soak",
        seconds=round(time.monotonic() - started, 1),
        batches=dict(load.posted),
        recipients=load.recipients,
        cancels=dict(load.cancels),
        send_processes_paused=paused,
        statuses=system.status_counts(),
        batch_statuses={
            s: int(n)
            for s, n in system.query("SELECT status, count(*) FROM batches GROUP BY status")
        },
        callbacks={
            s: int(n)
            for s, n in system.query("SELECT state, count(*) FROM callbacks GROUP BY state")
        },
        callbacks_received=system.sink.received,
        callbacks_not_delivered=callbacks_due,
        all_final_after_s=round(final_s, 1),
        callbacks_drained_after_s=round(drained_s, 1),
        not_final=not_final,
        batches_not_ended=len(batches_open),
        batches_not_ended_examples=[list(map(str, r)) for r in batches_open[:5]],
        cancelled_but_handed_off=len(cancelled & handed),
        double_handoffs=handoffs,
        server_log_lines=len(server_log.splitlines()),
        server_settings={
            name: system.query(f"SHOW {name}")[0][0]
            for name in ("log_lock_waits", "deadlock_timeout", "log_line_prefix")
        },
        **locks_report(server_log, long_wait_ms=args.long_wait_ms),
        # From pg_stat_activity, sampled: who waited for whom (the holder named).
        watched_waits=len(waits),
        watched_waits_over_1s=[w for w in waits if w["waited_s"] >= args.long_wait_ms / 1000][:12],
        not_final_by=not_final_by(system),
        by_account=by_account(system),
        process_errors={name: len(lines) for name, lines in processes.items()},
        process_error_examples={name: lines[:3] for name, lines in processes.items()},
        deadlock_victim_retries=sum(
            c.output().count("deadlock victim; running it again") for c in system.children
        ),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    p.add_argument(
        "--timeout", type=float, default=180.0, help="then at most this long until all are final"
    )
    p.add_argument("--worker-processes", type=int, default=4, help="send worker processes")
    p.add_argument("--concurrency", type=int, default=2, help="-c of each send worker")
    p.add_argument("--api-workers", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=25, help="Settings.chunk_size")
    p.add_argument("--receipt-delay", type=float, default=0.5, help="simulator receipts (s)")
    p.add_argument("--callback-concurrency", type=int, default=Settings.callback_concurrency)
    p.add_argument(
        "--latency-ms",
        type=float,
        default=10.0,
        help="simulator: per message (a hand-off of 25 takes 0.25 s: a pause often meets one)",
    )
    p.add_argument(
        "--pause-every",
        type=float,
        default=10.0,
        help="seconds between pauses of a send pool process beyond the lease (0: none)",
    )
    p.add_argument("--deadlock-timeout-ms", type=int, default=100)
    p.add_argument("--long-wait-ms", type=float, default=1000.0, help="a lock wait this long")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the temp directory (logs)")
    args = p.parse_args(argv)
    # What System and its harness read, fixed here.
    args.database = "postgres"
    args.mode = "soak"
    args.shared_dispatch = False
    args.py_spy = ""
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Out(args, {k: v for k, v in vars(args).items() if k not in ("keep", "mode")})
    system = System(args)
    return run_system(system, out, lambda: soak(system, out))


if __name__ == "__main__":
    sys.exit(main())
