"""Database plumbing: ids in bulk, the executemany insert every intake writes through, id lists."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from psycopg.adapt import PyFormat
from sqlalchemy import (
    ARRAY,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    func,
    select,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.types import TypeEngine

from dispatcher import db
from dispatcher.db import insert_many, new_ids, one_of

_META = MetaData()
_ROWS = Table(
    "test_insert_many",
    _META,
    Column("id", String(36), primary_key=True, default=lambda: str(uuid.uuid4())),
    Column("n", Integer),
    Column("tag", String(8)),
    Column("kind", String(8), default="plain"),
    Column("note", String(8), nullable=True),
    # Created inside each test's transaction and gone with its rollback: the shared
    # test databases keep exactly the migrated schema.
    prefixes=["TEMPORARY"],
)


def test_new_ids_are_distinct_time_ordered_uuids_in_canonical_form() -> None:
    before = time.time_ns() // 1_000_000
    ids = new_ids(2000)
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 2000
    for text in ids:
        parsed = uuid.UUID(text)
        assert (str(parsed), parsed.version, parsed.variant) == (text, 7, uuid.RFC_4122)
        assert before <= parsed.int >> 80 <= after
    assert new_ids(0) == []


@pytest.fixture()
def session(sessions: sessionmaker[Session]) -> Iterator[Session]:
    with sessions() as session:
        _ROWS.create(session.connection())
        yield session
        session.rollback()


def test_insert_many_writes_rows_shared_values_and_scalar_defaults(session: Session) -> None:
    rows = {"id": ["a", "b", "c"], "n": range(3), "note": [None, "x", None]}
    insert_many(session, _ROWS, rows=rows, same={"tag": "t"})
    insert_many(session, _ROWS, rows={"id": ["d", "e"], "note": [None, None]}, same={"n": 9})
    insert_many(session, _ROWS, rows={"id": []}, same={})
    written = session.execute(select(_ROWS).order_by(_ROWS.c.id)).all()
    assert [tuple(r) for r in written] == [
        ("a", 0, "t", "plain", None),
        ("b", 1, "t", "plain", "x"),
        ("c", 2, "t", "plain", None),
        ("d", 9, None, "plain", None),
        ("e", 9, None, "plain", None),
    ]


def test_insert_many_refuses_to_share_a_computed_default(session: Session) -> None:
    with pytest.raises(ValueError, match=r"test_insert_many\.id"):
        insert_many(session, _ROWS, rows={"n": [1, 2]}, same={"tag": "t"})


def test_one_of_selects_the_rows_an_in_list_would(session: Session) -> None:
    insert_many(session, _ROWS, rows={"id": ["a", "b", "c", "d"], "n": range(4)}, same={})

    def ids(values: list[str]) -> list[str]:
        found = session.scalars(select(_ROWS.c.id).where(one_of(session, _ROWS.c.id, values)))
        return sorted(found)

    assert ids(["b", "d", "zz"]) == ["b", "d"]
    assert ids(["c"]) == ["c"]
    assert ids([]) == []
    # Longer than the column: matches nothing (it is not cut to the column's length).
    insert_many(session, _ROWS, rows={"id": ["x" * 36], "n": [5]}, same={})
    assert ids(["x" * 40]) == []
    assert ids(["x" * 36]) == ["x" * 36]


def test_insert_many_carries_every_text_exactly(session: Session) -> None:
    # SQLite sends the rows as JSON (json_each): quotes, backslashes, non-ASCII and
    # control characters come back as sent; a NUL goes through executemany instead.
    texts = ['q"u\\te', "ï☃😀", "t\tn\n", "\\u0000", ""]
    if session.get_bind().dialect.name == "sqlite":  # PostgreSQL's text holds no NUL
        texts.append("n\x00x")
    ids = [f"t{i}" for i in range(len(texts))]
    insert_many(session, _ROWS, rows={"id": ids, "note": texts}, same={"n": 1})
    insert_many(session, _ROWS, rows={"id": ["u"], "n": [2**31 - 1]}, same={"note": "☃"})
    written = session.execute(select(_ROWS.c.id, _ROWS.c.n, _ROWS.c.note).order_by(_ROWS.c.id))
    assert [tuple(r) for r in written] == [
        *((f"t{i}", 1, note) for i, note in enumerate(texts)),
        ("u", 2**31 - 1, "☃"),
    ]


def test_insert_many_of_one_varying_column_carries_every_text_exactly(session: Session) -> None:
    # SQLite sends one varying column as a flat JSON array, each element read as is:
    # text that looks like JSON (a number, null, an array) stays text.
    ids = ['q"u\\te', "ï☃😀", "t\tn\n", "\\u0000", "", "1", "null", "[1]", "1.50"]
    insert_many(session, _ROWS, rows={"id": ids}, same={"n": 3, "note": None})
    written = session.execute(select(_ROWS.c.id, _ROWS.c.n, _ROWS.c.kind, _ROWS.c.note))
    assert sorted(tuple(r) for r in written) == sorted((i, 3, "plain", None) for i in ids)
    assert {type(r) for r in session.scalars(select(_ROWS.c.id))} == {str}


def test_text_arrays_carry_every_string_exactly(session: Session) -> None:
    if session.get_bind().dialect.name != "postgresql":
        pytest.skip("PostgreSQL's array dumper")
    from dispatcher.pgarrays import StrListDumper

    # Every character the array syntax treats specially, and words it would read as NULL.
    texts = ['q"u\\te', "a,b", "{x}", " pad ", "", "NULL", "null", "ï☃😀", "t\tn\n", "\\"]
    raw = session.connection().connection.dbapi_connection
    assert raw is not None
    assert raw.adapters.get_dumper(list, PyFormat.TEXT) is StrListDumper

    def unnest(values: list[object], type_: TypeEngine[object]) -> list[object]:
        return list(session.scalars(select(func.unnest(bindparam("v", values, type_=type_)))))

    assert unnest(texts, ARRAY(Text)) == texts
    # Quotes without a backslash, and strings with neither (joined as they are).
    assert unnest(['say "hi"', "plain", '"'], ARRAY(Text)) == ['say "hi"', "plain", '"']
    assert unnest(["a", "b:sms", ""], ARRAY(Text)) == ["a", "b:sms", ""]
    assert unnest([], ARRAY(Text)) == []
    # Not all strings: psycopg's own dumping.
    assert unnest(["a", None, "b"], ARRAY(Text)) == ["a", None, "b"]
    assert unnest([3, 1, 2], ARRAY(Integer)) == [3, 1, 2]


class Victim(Exception):
    """What psycopg raises for a transaction PostgreSQL aborted (its SQLSTATE)."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


def aborted(sqlstate: str) -> OperationalError:
    return OperationalError("UPDATE recipients", {}, Victim(sqlstate))


def test_a_deadlock_victim_runs_again_and_any_other_error_is_raised() -> None:
    """deadlock_retries runs the body again for a deadlock victim only, at most its
    tries in all, and a body that ends (or returns) ends the loop."""
    runs: list[int] = []
    for attempt in db.deadlock_retries("test"):
        with attempt:
            runs.append(len(runs))
            if len(runs) < 3:
                raise aborted(db.DEADLOCK)
    assert runs == [0, 1, 2]
    with pytest.raises(OperationalError):
        for attempt in db.deadlock_retries("test", tries=2):
            with attempt:
                raise aborted(db.DEADLOCK)  # the last run's error stands
    with pytest.raises(OperationalError, match="lock timeout"):
        for attempt in db.deadlock_retries("test"):
            with attempt:
                raise OperationalError("UPDATE", {}, Exception("lock timeout"))
    done = []
    for attempt in db.deadlock_retries("test"):
        with attempt:
            done.append(1)
    assert done == [1]
