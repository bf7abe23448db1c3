"""Database plumbing: the declarative base, engine and session factories.

SQLite is the embedded default and several processes write it at once, so its
connections run in WAL mode with a busy timeout and open every transaction with
``BEGIN IMMEDIATE`` (a deferred transaction that later writes fails at once with
"database is locked" instead of waiting), after passing the write gate
(``WriteGate``). PostgreSQL needs none of this.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, cast

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no gate, SQLite's busy handler alone
    fcntl = None  # type: ignore[assignment]

from sqlalchemy import (
    JSON,
    Boolean,
    ColumnElement,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    any_,
    bindparam,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

# Execution option marking a transaction that only reads (no write lock on SQLite).
log = logging.getLogger(__name__)

READ_ONLY = "dispatcher_read_only"
# Execution option marking the API's writes: they go first at SQLite's write gate.
WRITE_PRIORITY = "dispatcher_write_priority"

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: DateTime(), dict[str, Any]: JSON, list[str]: JSON}


def utcnow() -> datetime:
    """Now, as the naive UTC datetime every column stores."""
    return datetime.now(UTC).replace(tzinfo=None)


def new_id() -> str:
    """A fresh UUID4 string (batch, message, account and callback ids)."""
    return str(uuid.uuid4())


# The UUID variant's hex digit (binary 10xx) for each random hex digit.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def new_ids(count: int) -> list[str]:
    """``count`` fresh, time-ordered UUID strings (version 7, RFC 9562): 48 bits of
    Unix milliseconds, then 74 random bits from one read of the OS's randomness.

    For the many rows of one request (a batch's recipients). One id after another
    from uuid4() cost a syscall and two UUID objects each, the largest item of
    intake after number parsing; and random keys land on random pages of the
    primary key's index, so inserting cost more the larger the table grew (SQLite,
    100,000 rows: 35 us per row against 10 with ids that share their time prefix).
    """
    stamp = f"{time.time_ns() // 1_000_000:012x}"
    head = f"{stamp[:8]}-{stamp[8:12]}-7"
    text = os.urandom(10 * count).hex()
    return [
        f"{head}{h[:3]}-{_VARIANT[h[3]]}{h[4:7]}-{h[7:19]}"
        for h in (text[i : i + 20] for i in range(0, 20 * count, 20))
    ]


@contextmanager
def _flocked(fd: int, *, shared: bool = False) -> Iterator[None]:
    """Hold ``fd``'s flock lock (exclusive, or shared) for the block."""
    fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


class WriteGate:
    """A fair turn at SQLite's single write lock, across processes (``flock`` files),
    where the API's writers go before a waiting worker for a bounded number of turns.

    SQLite's busy handler makes a waiting writer sleep 1, 2, 5 ... up to 100 ms
    between tries, so it keeps losing to a process that commits and begins again at
    once (intake beside a busy send worker waited most of its time). Here a writer
    holds ``<db>-gate`` from before ``BEGIN IMMEDIATE`` to after ``COMMIT`` or
    ``ROLLBACK``, so SQLite's lock is then free or about to be. Only the holder of
    ``<db>-gate-slot`` waits on the gate, so the kernel wakes exactly that writer the
    moment the holder lets go, and a holder that wants to write again must queue
    behind it. Writers queue for the slot by kind: the API's (``priority``) on
    ``<db>-gate-api``, every other writer (workers, the scheduler) on
    ``<db>-gate-queue``.

    An API writer then holds ``<db>-gate-announce`` until it has the gate. A worker
    that holds the slot (or has just got the gate) while one does lets them go (the
    API writer, the only other writer that may wait for the slot, takes it), waits
    until that writer has the gate (``announce`` let go), and takes the slot back
    while holding ``<db>-gate-back``, which the next API writer needs (shared) to
    announce itself: each time it gives way, exactly one API transaction goes
    first, and a client's request does not wait behind a worker's 1,000-row
    transaction. A worker gives way at most ``YIELD_TURNS`` times per turn and not
    once it has waited ``YIELD_SECONDS``; then only the gate's holder goes before it,
    so heavy intake delays sending by a bounded amount and never stalls it. All
    waiting is in ``flock``: the kernel wakes the waiter, nobody polls.

    A writer that does not pass the gate, such as the ``sqlite3`` shell, is still
    waited for by SQLite's busy handler. A thread that already holds the gate on one
    connection and writes on another does not queue again (that would wait for
    itself forever): it gets SQLite's busy timeout, as before the gate. Each
    connection has its own open file descriptions (flock locks belong to those, so
    threads exclude each other too), opened again after a fork.
    """

    # Turns a waiting worker gives to the API's writers, and for how long it does.
    YIELD_TURNS = 4
    YIELD_SECONDS = 0.2
    # Per process, by kind of writer ("api", "worker"): turns, seconds waited, the
    # longest wait, turns given way (workers). Read with stats(): the benches do.
    _waits: dict[str, list[float]] = {"api": [0, 0.0, 0.0, 0], "worker": [0, 0.0, 0.0, 0]}
    # Gates held per thread (see the class docstring).
    _held = threading.local()

    def __init__(self, path: str) -> None:
        self.path = path
        self._fds: tuple[int, ...] | None = None
        self._pid = 0
        self._owner: Any = None

    def _files(self) -> tuple[int, ...]:
        """This connection's descriptors: worker queue, API queue, back, announce, slot, gate."""
        if self._fds is None or self._pid != os.getpid():
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
            names = ("-queue", "-api", "-back", "-announce", "-slot", "")
            self._fds = tuple(os.open(self.path + name, flags, 0o666) for name in names)
            self._pid = os.getpid()
        return self._fds

    @classmethod
    def stats(cls) -> dict[str, dict[str, float]]:
        """This process's waits at its gates so far, by kind of writer."""
        return {
            kind: {"turns": int(t), "waited_s": w, "max_wait_s": m, "gave_way": int(y)}
            for kind, (t, w, m, y) in cls._waits.items()
        }

    def acquire(self, *, priority: bool = False) -> None:
        """Wait for this connection's turn to write (nothing if the thread holds one);
        ``priority``: an API writer, which a waiting worker lets go first."""
        held = WriteGate._held
        if getattr(held, "count", 0):
            return
        try:
            worker_queue, api_queue, back, announce, slot, gate = self._files()
        except OSError:  # e.g. a read-only directory: SQLite's busy handler alone
            return
        started = time.monotonic()
        gave_way = 0
        with _flocked(api_queue if priority else worker_queue):
            if priority:
                with _flocked(back, shared=True):
                    fcntl.flock(announce, fcntl.LOCK_EX)
                try:
                    with _flocked(slot):
                        fcntl.flock(gate, fcntl.LOCK_EX)
                finally:
                    fcntl.flock(announce, fcntl.LOCK_UN)
            else:
                with _flocked(slot):
                    gave_way = self._worker_turn(back, announce, slot, gate, started)
        held.count = 1
        self._owner = held
        waited = time.monotonic() - started
        tally = WriteGate._waits["api" if priority else "worker"]
        tally[0] += 1
        tally[1] += waited
        tally[2] = max(tally[2], waited)
        tally[3] += gave_way

    def _worker_turn(self, back: int, announce: int, slot: int, gate: int, started: float) -> int:
        """A worker holding the slot: take the gate, letting each API writer that
        announces itself meanwhile go first, within the bounds; returns how many did."""
        turns = 0

        def may_give_way() -> bool:
            if turns >= self.YIELD_TURNS or time.monotonic() - started >= self.YIELD_SECONDS:
                return False
            try:
                fcntl.flock(announce, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True  # an API writer waits for the slot (the only other that may)
            fcntl.flock(announce, fcntl.LOCK_UN)
            return False

        while True:
            while may_give_way():
                # "back" keeps the next API writer from announcing itself (and taking
                # the slot) before this worker has the slot again, however late it
                # gets to wait for "announce" below.
                with _flocked(back):
                    fcntl.flock(slot, fcntl.LOCK_UN)
                    # Woken once that writer has the gate (and so has let the slot go).
                    with _flocked(announce, shared=True):
                        fcntl.flock(slot, fcntl.LOCK_EX)
                turns += 1
            fcntl.flock(gate, fcntl.LOCK_EX)
            # One that announced itself while this worker waited for the gate goes first
            # too: its request would otherwise wait for this whole transaction.
            if not may_give_way():
                return turns
            fcntl.flock(gate, fcntl.LOCK_UN)

    def release(self) -> None:
        """Let the next writer in (nothing if this connection does not hold the gate)."""
        if self._owner is None:
            return
        self._owner.count = 0
        self._owner = None
        assert self._fds is not None
        fcntl.flock(self._fds[-1], fcntl.LOCK_UN)

    def close(self) -> None:
        """Release, and close the files (closing them would release the lock too)."""
        self.release()
        if self._fds is not None and self._pid == os.getpid():
            for fd in self._fds:
                os.close(fd)
        self._fds = None


class GatedConnection(sqlite3.Connection):
    """A SQLite connection whose write transactions pass a ``WriteGate`` first."""

    gate: WriteGate | None = None

    def begin_write(self, *, priority: bool = False) -> None:
        """``BEGIN IMMEDIATE``, after this database's write gate (``priority``: an
        API writer, see ``WriteGate``)."""
        if self.gate is not None:
            self.gate.acquire(priority=priority)
        try:
            self.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._leave()
            raise

    def _leave(self) -> None:
        if self.gate is not None:
            self.gate.release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._leave()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._leave()

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.gate is not None:
                self.gate.close()


def _gate_path(database: str | None) -> str | None:
    """Where a file database's gate lives (None: in memory, or not POSIX)."""
    if fcntl is None or not database or database == ":memory:" or database.startswith("file:"):
        return None
    return os.path.abspath(database) + "-gate"


def make_engine(url: str, *, write_gate: bool = True, **kwargs: Any) -> Engine:
    """An engine for ``url``, with the SQLite settings multi-process writing needs
    (``write_gate``: its writers pass the ``WriteGate``)."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"timeout": 30, "factory": GatedConnection}, **kwargs
        )
        gate_path = _gate_path(engine.url.database) if write_gate else None

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            if gate_path is not None:
                dbapi_conn.gate = WriteGate(gate_path)
            # Take transaction control from the driver so BEGIN IMMEDIATE is ours.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # Readers stay deferred: in WAL mode they never wait for the writer.
            if conn.get_execution_options().get(READ_ONLY, False):
                conn.exec_driver_sql("BEGIN")
            else:
                priority = conn.get_execution_options().get(WRITE_PRIORITY, False)
                conn.connection.dbapi_connection.begin_write(priority=priority)

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    engine = create_engine(url, **kwargs)
    if engine.dialect.driver == "psycopg":
        # Imported here: psycopg is needed only for PostgreSQL.
        from dispatcher import pgarrays

        event.listen(engine, "connect", lambda dbapi_conn, _record: pgarrays.install(dbapi_conn))
    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded values after commit (views dump after committing)."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with factory() as session, session.begin():
        yield session


# PostgreSQL's SQLSTATE for a transaction aborted as a deadlock victim, and how many
# times a write that may meet one runs in all.
DEADLOCK = "40P01"
DEADLOCK_TRIES = 3


class Attempt:
    """One run of a write transaction (see :func:`deadlock_retries`)."""

    def __init__(self, *, what: str, last: bool) -> None:
        self.what = what
        self.last = last
        self.done = False

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _tb: Any
    ) -> bool:
        """True (the error is swallowed, the loop runs again) only for a deadlock victim."""
        if kind is None:
            self.done = True
            return False
        victim = isinstance(exc, OperationalError) and (
            getattr(exc.orig, "sqlstate", None) == DEADLOCK
        )
        if self.last or not victim:
            return False
        log.warning("%s was a deadlock victim; running it again", self.what)
        return True


def deadlock_retries(what: str, *, tries: int = DEADLOCK_TRIES) -> Iterator[Attempt]:
    """Runs of a write transaction that PostgreSQL may abort as a deadlock victim:
    ``for attempt in deadlock_retries("..."): with attempt, transaction(f) as s: ...``.

    The victim is rolled back whole, so a body that writes only what the caller holds in
    memory (conditional updates, inserts) is safe to run again; the last run's error, and
    any other error, is raised. A ``return`` in the body ends the loop as well.
    """
    for i in range(tries):
        attempt = Attempt(what=what, last=i == tries - 1)
        yield attempt
        if attempt.done:
            return


def begin_read_only(session: Session) -> None:
    """Start the session's transaction as a reader (SQLite: no write lock taken)."""
    session.connection(execution_options={READ_ONLY: True})


@contextmanager
def read_transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction that only reads; it is rolled back, never committed.

    What it loaded is detached first, so callers keep a snapshot after it ends.
    """
    with factory() as session:
        begin_read_only(session)
        try:
            yield session
        finally:
            session.expunge_all()
            session.rollback()


def one_of(session: Session, column: Any, values: Sequence[Any]) -> ColumnElement[bool]:
    """``column IN (values)``; on PostgreSQL ``column = ANY(array)``, one parameter.

    An IN list of n parameters is a new statement for every n: the driver parses its
    placeholders and the server its text each time (a thousand of them are a large
    part of applying a thousand receipts). One array keeps the text the same, so the
    driver caches it and the server prepares it once. On SQLite, strings go as one
    JSON array (``IN (SELECT value FROM json_each(?))``): SQLAlchemy coerced, rendered
    and bound every element of an IN list, about 1.5 us each (2 us with SQLite's parse).
    """
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        # Strings as varchar without a length: a cast to varchar(n) would cut a longer
        # value, which could then match another row.
        kind = String() if isinstance(column.type, String) else column.type
        return cast(ColumnElement[bool], column == any_(bindparam(None, list(values), ARRAY(kind))))
    if dialect == "sqlite" and isinstance(column.type, String) and set(map(type, values)) <= {str}:
        each = func.json_each(bindparam(None, json.dumps(list(values)))).table_valued("value")
        return cast(ColumnElement[bool], column.in_(select(each.c.value)))
    return cast(ColumnElement[bool], column.in_(list(values)))


@lru_cache(maxsize=64)
def _insert_sql(
    table: Table, dialect: Dialect, names: tuple[str, ...]
) -> tuple[str, tuple[str, ...] | None]:
    """The INSERT of ``names`` in ``dialect``'s SQL, and its parameter order if positional."""
    compiled = table.insert().compile(dialect=dialect, column_keys=list(names))
    order = tuple(compiled.positiontup) if compiled.positional and compiled.positiontup else None
    return str(compiled), order


def _unnest_type(column: Any, dialect: Dialect) -> str | None:
    """The PostgreSQL type an array of this column's values is cast to, or None.

    Strings go as ``text`` (the insert's assignment cast then refuses what is too long,
    where a cast to ``varchar(n)`` would cut it silently).
    """
    if isinstance(column.type, String):
        return "text"
    if isinstance(column.type, Integer | DateTime | Boolean):
        return str(column.type.compile(dialect=dialect))
    return None


@lru_cache(maxsize=64)
def _unnest_sql(
    table: Table, dialect: Dialect, varying: tuple[str, ...], same: tuple[str, ...]
) -> str | None:
    """PostgreSQL: one INSERT ... SELECT FROM unnest(arrays), or None if a type does not fit.

    Its parameters: the shared values, then one array per varying column.
    """
    quote = dialect.identifier_preparer.quote
    arrays, values = [], []
    for key in varying:
        kind = _unnest_type(table.c[key], dialect)
        if kind is None:
            return None
        arrays.append(f"%s::{kind}[]")
    for key in same:
        kind = _unnest_type(table.c[key], dialect)
        if kind is None:
            return None
        values.append(f"%s::{kind}")
    names = ", ".join(quote(table.c[key].name) for key in (*varying, *same))
    shared = "".join(f", {value}" for value in values)
    return (
        f"INSERT INTO {dialect.identifier_preparer.format_table(table)} ({names}) "
        f"SELECT rows.*{shared} FROM unnest({', '.join(arrays)}) AS rows"
    )


@lru_cache(maxsize=64)
def _json_each_sql(
    table: Table, dialect: Dialect, varying: tuple[str, ...], same: tuple[str, ...]
) -> str:
    """SQLite: one INSERT ... SELECT FROM json_each(rows), each row a JSON array of the
    varying columns' values (``json_rows``; one column's value as is, no ``json_extract``
    per row). Its parameters: the shared values, then the rows' JSON text."""
    quote = dialect.identifier_preparer.quote
    names = ", ".join(quote(table.c[key].name) for key in (*varying, *same))
    read = (
        ["value"]
        if len(varying) == 1
        else [f"json_extract(value, '$[{i}]')" for i in range(len(varying))]
    )
    values = read + ["?"] * len(same)
    return (
        f"INSERT INTO {dialect.identifier_preparer.format_table(table)} ({names}) "
        f"SELECT {', '.join(values)} FROM json_each(?)"
    )


def json_rows(columns: Sequence[Sequence[Any]]) -> str | None:
    """The rows as one JSON array of arrays (of one column: a flat array of its values),
    or None where JSON would not carry a value exactly (bytes, NaN, a NUL character:
    those go through executemany)."""
    rows = list(columns[0]) if len(columns) == 1 else list(zip(*columns, strict=True))
    try:
        text = json.dumps(rows, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError):
        return None
    return None if "\\u0000" in text else text


def insert_many(
    session: Session,
    table: Table,
    *,
    rows: Mapping[str, Sequence[Any]],
    same: Mapping[str, Any],
) -> None:
    """INSERT one row per position of ``rows``' columns; ``same`` holds every row's value.

    Each column's type converts a shared value once and the per-row values in one
    pass, and no parameter dict is built per row: the ORM's and Core's bulk inserts
    spent more CPU on that than the database on the rows. SQLite gets one executemany
    through the driver; PostgreSQL one statement over arrays (``unnest``), a third of
    the client CPU of psycopg's executemany. SQLite gets one statement over the rows
    as JSON (``json_each``): on SQLite intake holds the one write lock while it
    inserts, and this took 8 ms for 1,000 recipients against 20 for the executemany
    (binding every column of every row, shared values included). Columns left out take their scalar
    default; one whose default is computed (a fresh id, a time) must be given, since
    it would differ per row.
    """
    values: dict[str, Any] = dict(same)
    for column in table.columns:
        if column.key in rows or column.key in values or column.default is None:
            continue
        if not column.default.is_scalar:
            raise ValueError(f"insert_many needs {table.name}.{column.key} (computed default)")
        values[column.key] = column.default.arg  # type: ignore[attr-defined]
    conn = session.connection()
    dialect = conn.dialect
    count = len(next(iter(rows.values())))
    if not count:
        return
    varying: dict[str, Sequence[Any]] = {}
    for key, column_values in rows.items():
        assert len(column_values) == count, f"{key}: {len(column_values)} values for {count} rows"
        process = table.c[key].type._cached_bind_processor(dialect)
        varying[key] = list(map(process, column_values)) if process else column_values
    shared: dict[str, Any] = {}
    for key, value in values.items():
        process = table.c[key].type._cached_bind_processor(dialect)
        shared[key] = process(value) if process else value
    if dialect.name == "postgresql":
        sql = _unnest_sql(table, dialect, tuple(varying), tuple(shared))
        if sql is not None:
            arrays = [list(column_values) for column_values in varying.values()]
            # In a list: a bare tuple starting with a list would read as many parameter sets.
            conn.exec_driver_sql(sql, [(*shared.values(), *arrays)])
            return
    if dialect.name == "sqlite":
        text = json_rows(list(varying.values()))
        if text is not None:
            sql = _json_each_sql(table, dialect, tuple(varying), tuple(shared))
            conn.exec_driver_sql(sql, (*shared.values(), text))
            return
    columns = {**varying, **{key: itertools.repeat(v, count) for key, v in shared.items()}}
    names = tuple(columns)
    sql, order = _insert_sql(table, dialect, names)
    assert order is None or set(order) == set(names), f"parameters {order} for {names}"
    if order is not None:
        params: list[Any] = list(zip(*(columns[name] for name in order), strict=False))
    else:
        params = [
            dict(zip(names, row, strict=True)) for row in zip(*columns.values(), strict=False)
        ]
    conn.exec_driver_sql(sql, params)
