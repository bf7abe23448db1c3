"""SQLite's query plans for the send path: a statement that names recipients by id,
batch or message id is answered by that index, never by scanning a status."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Engine, event, update

from dispatcher.batches import service as batches
from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.engine import scheduling, sending
from dispatcher.migrate import alembic_config, upgrade
from dispatcher.outbox import Message, TaskName
from dispatcher.receipts import service as receipts
from dispatcher.runtime import Runtime
from dispatcher.webhooks.models import Callback
from tests.factories import make_account, numbers
from tests.helpers import RecordingPublisher, make_settings

STATUS_INDEX = "ix_recipients_status_next"
# A recipients statement that names its rows by one of these must go by its index.
BY_KEY = re.compile(r"recipients\.(id|batch_id|provider_message_id) (=|IN)")


@pytest.fixture(scope="module")
def fresh_settings(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A SQLite database of its own, migrated (the planner's statistics are the migration's)."""
    tmp = tmp_path_factory.mktemp("plans")
    settings = make_settings(
        database_url=f"sqlite:///{tmp / 'dispatcher.db'}",
        redis_url=redis_url,
        var=tmp / "var",
        simulator={"latency_ms": 0, "receipt_delay": 0},
    )
    upgrade(settings)
    return settings


@pytest.fixture()
def rt(fresh_settings: Settings) -> Iterator[Runtime]:
    runtime = Runtime(fresh_settings, RecordingPublisher())
    yield runtime
    runtime.dispose()


def _plan(engine: Engine, statement: str, params: Any) -> str:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params).all()
    return " | ".join(row[3] for row in rows)


def _capture(engine: Engine) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _keep(_conn: Any, _cursor: Any, statement: str, params: Any, _ctx: Any, many: bool) -> None:
        if BY_KEY.search(statement) and not statement.startswith("EXPLAIN"):
            seen.append((statement, params[0] if many else params))

    return seen


def test_the_send_path_finds_recipients_by_key_not_by_status(rt: Runtime) -> None:
    seen = _capture(rt.engine)
    settings, publisher = rt.settings, rt.publisher
    assert isinstance(publisher, RecordingPublisher)
    with transaction(rt.sessions) as session:
        account = make_account(session, name="plans")
        new = batches.NewBatch(
            sender="Plans",
            body="hello",
            destinations=numbers(30, prefix="+44775"),
            channels=["sms"],
            send_at=utcnow() - timedelta(seconds=1),
            callback_url="http://127.0.0.1:9/hooks",
        )
        batch_id = batches.create_batch(
            session=session, settings=settings, account=account, new=new
        ).batch.id
    with transaction(rt.sessions) as session:
        scheduling.dispatch_batch(
            session=session, settings=settings, batch_id=batch_id, now=utcnow()
        )
    chunks = [m for m in publisher.messages if isinstance(m, Message)]
    for m in [m for m in chunks if m.task is TaskName.SEND_CHUNK]:
        sending.send_recipients(
            factory=rt.sessions,
            settings=settings,
            providers=rt.providers,
            limiter=rt.limiter,
            batch_id=m.kwargs["batch_id"],
            seq_range=(m.kwargs["start"], m.kwargs["end"]),
        )
    simulator = next(p for p in rt.providers.values() if p.name == "simulator")
    due = simulator.due_receipts()  # type: ignore[attr-defined]
    with transaction(rt.sessions) as session:
        applied = receipts.accept(
            session=session, provider=simulator.name, receipts=due, now=utcnow()
        ).applied
    assert applied == 30
    kinds = {BY_KEY.search(s)[1] for s, _ in seen}  # type: ignore[index]
    assert kinds == {"id", "batch_id", "provider_message_id"}, "the flow ran every kind"
    for statement, params in seen:
        assert STATUS_INDEX not in _plan(rt.engine, statement, params), statement


def test_a_callbacks_outcome_finds_it_by_id_not_by_state(rt: Runtime) -> None:
    # A group's worth of ids: for a few the planner takes the key even without statistics.
    ids = [f"cb-{i}" for i in range(500)]
    statement = (
        update(Callback)
        .where(Callback.id.in_(ids), Callback.state == "delivering", Callback.attempts == 1)
        .values(state="delivered")
        .compile(rt.engine, compile_kwargs={"render_postcompile": True})
    )
    order = statement.positiontup or ()
    plan = _plan(rt.engine, str(statement), tuple(statement.params[k] for k in order))
    assert "sqlite_autoindex_callbacks_1" in plan, plan


def test_the_statistics_go_with_a_downgrade_and_come_back(
    fresh_settings: Settings, tmp_path: Path
) -> None:
    settings = dataclasses.replace(fresh_settings, database_url=f"sqlite:///{tmp_path / 'd.db'}")
    upgrade(settings)
    rt = Runtime(settings, RecordingPublisher())

    def stats() -> int:
        with rt.engine.connect() as conn:
            return conn.exec_driver_sql("SELECT count(*) FROM sqlite_stat1").scalar_one()

    try:
        assert stats() == 8
        command.downgrade(alembic_config(settings), "0008_receipt_indexes")
        assert stats() == 0
        upgrade(settings)
        assert stats() == 8
    finally:
        rt.dispose()
