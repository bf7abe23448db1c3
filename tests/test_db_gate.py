"""SQLite's write gate (dispatcher/db.py, WriteGate): writers of several processes take
turns without deadlock, and a thread that holds the gate is not made to wait for itself."""

from __future__ import annotations

import itertools
import multiprocessing
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from dispatcher.db import GatedConnection, make_engine, make_session_factory, transaction

WRITES = 40
ROWS_PER_WRITE = 200


def _writer(url: str, who: str, gated: bool, barrier: Any) -> None:
    """WRITES transactions, each a log row and ROWS_PER_WRITE filler rows (a few ms held)."""
    engine = make_engine(url, write_gate=gated)
    sessions = make_session_factory(engine)
    barrier.wait(timeout=60)
    filler = [{"who": who} for _ in range(ROWS_PER_WRITE)]
    for _ in range(WRITES):
        with transaction(sessions) as session:
            session.execute(text("INSERT INTO turns (who) VALUES (:who)"), {"who": who})
            session.execute(text("INSERT INTO filler (who) VALUES (:who)"), filler)
    engine.dispose()


def _contend(tmp_path: Path, *, gated: bool) -> list[str]:
    """Two writer processes started together; the order their transactions committed in."""
    path = tmp_path / "gate.db"
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE turns (n INTEGER PRIMARY KEY, who TEXT)")
        conn.exec_driver_sql("CREATE TABLE filler (n INTEGER PRIMARY KEY, who TEXT)")
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(2)
    children = [
        spawn.Process(target=_writer, args=(url, who, gated, barrier)) for who in ("a", "b")
    ]
    for child in children:
        child.start()
    try:
        for child in children:
            child.join(timeout=120)
        assert [child.exitcode for child in children] == [0, 0]
    finally:
        for child in children:
            if child.is_alive():
                child.kill()
                child.join()
    with engine.connect() as conn:
        order = [who for (who,) in conn.exec_driver_sql("SELECT who FROM turns ORDER BY n")]
    engine.dispose()
    return order


def test_two_processes_take_turns_at_the_write_gate(tmp_path: Path) -> None:
    order = _contend(tmp_path, gated=True)
    assert sorted(order) == ["a"] * WRITES + ["b"] * WRITES
    # Neither waits out the other's whole run: they alternate (the queue file stops a
    # writer that has just committed from taking the gate again ahead of a waiter).
    switches = sum(1 for x, y in itertools.pairwise(order) if x != y)
    assert switches >= WRITES // 2, order
    assert (tmp_path / "gate.db-gate").exists()


def test_a_thread_holding_the_gate_gets_the_busy_timeout_not_a_hang(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'self.db'}"
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    with transaction(sessions) as session:
        session.execute(text("CREATE TABLE t (n INTEGER)"))
    second = engine.raw_connection()
    raw = second.driver_connection
    assert isinstance(raw, GatedConnection)
    raw.execute("PRAGMA busy_timeout=50")
    with transaction(sessions) as session:
        session.execute(text("INSERT INTO t VALUES (1)"))
        # The same thread, another connection: SQLite's "locked" after its busy timeout.
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            raw.begin_write()
    # Released: another thread's writer gets in at once.
    done = threading.Event()

    def write() -> None:
        with transaction(sessions) as session:
            session.execute(text("INSERT INTO t VALUES (2)"))
        done.set()

    worker = threading.Thread(target=write)
    worker.start()
    worker.join(timeout=30)
    assert done.is_set()
    raw.begin_write()
    raw.rollback()
    second.close()
    with engine.connect() as conn:
        assert [n for (n,) in conn.exec_driver_sql("SELECT n FROM t ORDER BY n")] == [1, 2]
    engine.dispose()
