"""Database plumbing: the declarative base, engine and session factories.

SQLite is the embedded default and several processes write it at once, so its
connections run in WAL mode with a busy timeout and open every transaction with
``BEGIN IMMEDIATE`` (a deferred transaction that later writes fails at once with
"database is locked" instead of waiting). PostgreSQL needs none of this.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Engine, MetaData, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

# Execution option marking a transaction that only reads (no write lock on SQLite).
READ_ONLY = "dispatcher_read_only"

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


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``, with the SQLite settings multi-process writing needs."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
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
            read_only = conn.get_execution_options().get(READ_ONLY, False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded values after commit (views dump after committing)."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with factory() as session, session.begin():
        yield session


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
