"""The Alembic migrations build exactly the schema the models describe, and undo it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from dispatcher.config import Settings
from dispatcher.db import make_engine
from dispatcher.migrate import alembic_config, upgrade
from dispatcher.models import Base


def _diff_from_models(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.fixture()
def empty_database_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """An empty database of its own on the same server (the shared one must stay migrated)."""
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    name = f"migrations_{uuid.uuid4().hex}"
    admin = make_engine(database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(database_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def test_migrations_match_the_models(database_url: str) -> None:
    assert _diff_from_models(database_url) == []


def test_every_revision_downgrades_and_upgrades_again(empty_database_url: str) -> None:
    settings = Settings(database_url=empty_database_url)
    upgrade(settings)
    command.downgrade(alembic_config(settings), "base")
    assert _tables(empty_database_url) == {"alembic_version"}
    upgrade(settings)
    assert _diff_from_models(empty_database_url) == []
