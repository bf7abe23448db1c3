"""The one writer of recipient and batch statuses: checked, conditional, and recorded.

Every status change is one conditional ``UPDATE ... WHERE status IN (...)`` whose
sources come from :mod:`dispatcher.states`, so a row that moved meanwhile (a
cancel, a receipt, a reclaim) is simply not matched; the rows that did move are
returned and their events and callbacks written in the same call.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from operator import itemgetter
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    FromClause,
    String,
    Table,
    Text,
    Update,
    bindparam,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from dispatcher.batches import events
from dispatcher.batches.models import Batch, Recipient
from dispatcher.db import json_rows, one_of
from dispatcher.states import BatchStatus, RecipientStatus, batch_guard, guard

recipients_table = cast(Table, Recipient.__table__)


# A recipient that moved: its change, made straight from the returned row (one per row).
Moved = events.Change


def transition_recipients(
    *,
    session: Session,
    to: RecipientStatus,
    at: datetime,
    where: Sequence[ColumnElement[bool]] = (),
    ids: Iterable[str] | None = None,
    values: Mapping[str, Any] | None = None,
    each: Mapping[str, Mapping[str, Any]] | None = None,
    current: Iterable[RecipientStatus] | None = None,
    batch: Batch | None = None,
    record: bool = True,
    claimed_at: datetime | None = None,
) -> list[Moved]:
    """Move the recipients matching ``where``/``ids`` (and in an allowed status) to ``to``.

    ``values`` are set on every row; ``each`` maps recipient ids to their own values
    (every mapping with the same keys) and limits the move to those ids, and so takes
    no ``where`` or ``ids``. ``current`` narrows the sources (each must be allowed to
    move to ``to``); ``claimed_at`` to the rows still holding the claim made then (a
    record's: a row reclaimed and claimed again since is the newer claim's to record).
    Events and callbacks are recorded for the rows that moved unless ``record`` is
    false; ``batch`` saves loading it when every row belongs to it.
    """
    if each is not None and (where or ids is not None):
        # _write_each checks id, status and claim only (an executemany takes no expanding
        # IN): a row failing the caller's conditions would take its values without moving.
        raise ValueError("per-row values (each) name their rows: no where or ids with them")
    sources = guard(to, current)
    conditions = [*where, Recipient.status.in_(sources)]
    if claimed_at is not None:
        conditions.append(Recipient.claimed_at == claimed_at)
    common = dict(values or {})
    if ids is not None:
        conditions.append(Recipient.id.in_(list(ids)))
    synchronize = _synchronize(session)
    if each:
        shared, keys = _split_each(each)
        common |= shared
        # Joined in only when nothing loaded needs the ORM's synchronisation.
        source = None if synchronize else _each_source(session, each, keys)
        if source is not None:
            # The per-row values joined in: the same statement writes them.
            conditions.append(Recipient.id == source.c.id)
            common |= {key: source.c[key] for key in keys}
        else:
            conditions.append(one_of(session, Recipient.id, list(each)))
            _write_each(session, each, keys, sources, claimed_at)
    elif each is not None:
        return []
    rows = _update_rows(
        session,
        update(Recipient)
        .where(*conditions)
        .values(status=to, updated_at=at, **common)
        .returning(*events.CHANGE_COLUMNS),
        synchronize,
    )
    moved = list(map(Moved._make, rows))
    if record and moved:
        by_batch: dict[str | None, list[events.Change]] = defaultdict(list)
        for m in moved:
            by_batch[m.batch_id].append(m)
        for batch_id, changes in by_batch.items():
            owner = batch if batch is not None and batch.id == batch_id else None
            owner = owner or session.get(Batch, batch_id)
            assert owner is not None
            events.record(session=session, batch=owner, status=to, changes=changes, at=at)
    return moved


def _synchronize(session: Session) -> str | bool:
    """The ORM's synchronisation of a bulk UPDATE: none when no recipient is loaded.

    Its "fetch" fallback (for criteria it cannot evaluate in Python, such as
    ``= ANY(array)``) walks every returned row; a worker's session loads no recipient.
    """
    loaded = any(isinstance(o, Recipient) for o in session.identity_map.values())
    return "auto" if loaded else False


def claim_recipients(
    *,
    session: Session,
    where: Sequence[ColumnElement[bool]],
    values: Mapping[str, Any],
    at: datetime,
    returning: Sequence[Any],
) -> list[Any]:
    """Win queued recipients for sending; returns ``returning`` of each row won.

    The at-most-once guard: only ``queued`` rows can be claimed and one worker
    wins each. Not reported (a claim is not a status the client sees).
    """
    sources = guard(RecipientStatus.SENDING, (RecipientStatus.QUEUED,))
    return _update_rows(
        session,
        update(Recipient)
        .where(*where, Recipient.status.in_(sources))
        .values(status=RecipientStatus.SENDING, updated_at=at, **values)
        .returning(*returning),
        # Nothing of these rows is loaded in a worker's session: no ORM bookkeeping.
        False,
    )


def _update_rows(session: Session, statement: Update, synchronize: str | bool) -> list[Any]:
    """Run a recipients' UPDATE ... RETURNING; its rows.

    Without synchronisation it runs as Core on the session's connection (after the
    flush the ORM would do): the ORM's bulk-update path and its row loading cost
    more than the statement's own execution, for nothing a worker uses.
    """
    if synchronize:
        options = {"synchronize_session": synchronize}
        return list(session.execute(statement, execution_options=options).all())
    session.flush()
    return list(session.connection().execute(statement).all())


def _split_each(each: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """The values every row of ``each`` shares, and the keys whose values differ."""
    rows = list(each.values())
    first = rows[0]
    # list.count compares in C (identity first): a generator per key was a per-row cost.
    shared = {
        k: v for k, v in first.items() if list(map(itemgetter(k), rows)).count(v) == len(rows)
    }
    return shared, [k for k in first if k not in shared]


def _each_source(
    session: Session, each: Mapping[str, Mapping[str, Any]], keys: list[str]
) -> FromClause | None:
    """The per-row values of ``keys`` as a table (id, *keys) the UPDATE joins, or None.

    For string columns only (a sent group's message ids). An executemany of
    single-row UPDATEs cost a statement and a second row version per recipient
    (PostgreSQL: server CPU -35%, client -12% in bench.sendpath; SQLite: a second
    rewrite of the row, 9 us per recipient). PostgreSQL reads text arrays, SQLite
    one JSON text (once its planner statistics made it look each id up by key: it
    used to scan the status, at twice the executemany's CPU).
    """
    dialect = session.get_bind().dialect.name
    if not keys or not all(isinstance(recipients_table.c[k].type, String) for k in keys):
        return None
    ids = list(each)
    columns = [ids, *([each[rid][k] for rid in ids] for k in keys)]
    if dialect == "sqlite":
        text = json_rows(columns)
        if text is None:
            return None
        rows = func.json_each(bindparam(None, text, type_=Text, unique=True)).table_valued("value")
        values = [
            func.json_extract(rows.c.value, f"$[{i}]").label(name)
            for i, name in enumerate(["id", *keys])
        ]
        return select(*values).select_from(rows).subquery("per_row")
    if dialect != "postgresql":
        return None
    params = [bindparam(None, a, type_=ARRAY(Text), unique=True) for a in columns]
    return func.unnest(*params).table_valued("id", *keys).render_derived(name="per_row")


def _write_each(
    session: Session,
    each: Mapping[str, Mapping[str, Any]],
    keys: list[str],
    sources: Sequence[RecipientStatus],
    claimed_at: datetime | None,
) -> None:
    """Per-row values of ``keys``, in one executemany, before the status moves.

    For values :func:`_each_source` cannot carry (numbers, times: a fallback's).
    """
    if not keys:
        return
    params = [{"_rid": rid, **{f"_v_{k}": v[k] for k in keys}} for rid, v in each.items()]
    # Plain comparisons: an expanding IN cannot be used with executemany.
    conditions = [
        recipients_table.c.id == bindparam("_rid"),
        or_(*(recipients_table.c.status == s for s in sources)),
    ]
    if claimed_at is not None:
        # The same value for every row: the statement's own parameter.
        conditions.append(recipients_table.c.claimed_at == claimed_at)
    session.connection().execute(
        recipients_table.update()
        .where(*conditions)
        .values({k: bindparam(f"_v_{k}") for k in keys}),
        params,
    )


def transition_batch(
    *,
    session: Session,
    batch_id: str,
    to: BatchStatus,
    at: datetime,
    where: Sequence[ColumnElement[bool]] = (),
    values: Mapping[str, Any] | None = None,
    current: Iterable[BatchStatus] | None = None,
) -> bool:
    """Move one batch to ``to`` if it is in an allowed status (and ``where`` holds)."""
    result = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status.in_(batch_guard(to, current)), *where)
        .values(status=to, modified_at=at, **(values or {}))
    )
    return bool(cast(CursorResult[Any], result).rowcount)
