"""Column shapes and table operations the migrations share: each table says only what is its own.

Applied revisions call these: never change what a helper builds (an old revision would
then build another schema); add a new helper instead. Constraint names come from the
naming convention of ``dispatcher.db.NAMING``, which Alembic applies to these tables too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

Column = sa.Column[Any]


def uuid(name: str = "id", *args: Any, nullable: bool = False) -> Column:
    """A uuid4 kept as 36 characters: a row's own id, or (with a ForeignKey) a reference."""
    return sa.Column(name, sa.String(length=36), *args, nullable=nullable)


def serial() -> Column:
    """The auto-incremented integer id of an append-only log."""
    return sa.Column("id", sa.Integer(), autoincrement=True, nullable=False)


def string(name: str, length: int, *, nullable: bool = False) -> Column:
    """A bounded text column."""
    return sa.Column(name, sa.String(length=length), nullable=nullable)


def column(name: str, type_: sa.types.TypeEngine[Any], *, nullable: bool = False) -> Column:
    """A column of any other type (Text, Integer, Float, JSON)."""
    return sa.Column(name, type_, nullable=nullable)


def moment(name: str, *, nullable: bool = False) -> Column:
    """A naive UTC datetime, as every time column stores it."""
    return sa.Column(name, sa.DateTime(), nullable=nullable)


def status(enum_name: str, values: str) -> Column:
    """A ``status`` column of the space-separated ``values``, stored as a string (no CHECK)."""
    kind = sa.Enum(*values.split(), name=enum_name, native_enum=False, length=16)
    return sa.Column("status", kind, nullable=False)


def error() -> tuple[Column, Column]:
    """The provider's error code and text of a failed or reported recipient."""
    return string("error_code", 32, nullable=True), string("error_text", 500, nullable=True)


def create_table(
    name: str,
    *items: Any,
    key: Sequence[str] = ("id",),
    indexes: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Create table ``name`` of ``items`` (columns, constraints), primary ``key``, ``indexes``."""
    op.create_table(name, *items, sa.PrimaryKeyConstraint(*key))
    for index, columns in (indexes or {}).items():
        op.create_index(index, name, list(columns))


def index(
    name: str,
    table: str,
    columns: Sequence[str],
    *,
    where: str | None = None,
    concurrently: bool = False,
) -> None:
    """An index; with ``where``, partial with that predicate on both databases.

    ``concurrently`` builds it without blocking writes on PostgreSQL (outside a
    transaction only: see ``autocommit_block``).
    """
    predicate = sa.text(where) if where else None
    op.create_index(
        name,
        table,
        list(columns),
        sqlite_where=predicate,
        postgresql_where=predicate,
        postgresql_concurrently=concurrently,
    )
