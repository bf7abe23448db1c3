"""The receipts service on SQLite and PostgreSQL: apply, keep, settle, drop and finalise.

A receipt that comes before its hand-off is recorded is kept and applied in the
transaction that records the outcome (or reclaim's), never lost; one that never
matches is dropped after the retention and counted; a sent message with no
receipt by the deadline becomes ``unknown``, and its batch's reports fire.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.batches.models import Batch, Recipient
from dispatcher.channels.base import Lookup
from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.engine import sending
from dispatcher.receipts import service as receipts
from dispatcher.states import BatchStatus
from dispatcher.webhooks.models import Callback
from tests.factories import Tenant
from tests.helpers.engine import end_leftover_claims
from tests.helpers.receipts import (
    Carrier,
    R,
    accept,
    claimed_batch,
    event_trail,
    pending,
    record,
    ref_of,
    states,
    stored_while_recorded,
)


def test_a_receipt_before_the_record_is_kept_and_applied_with_the_outcome(
    sessions: sessionmaker[Session], settings: Settings, tenant: Tenant
) -> None:
    batch_id, (first, second) = claimed_batch(sessions, settings, tenant)
    early = accept(
        sessions,
        "carrier",
        receipts.Receipt(ref_of(first.id), "delivered"),
        receipts.Receipt(ref_of(second.id), "failed", "EC21", "absent"),
    )
    assert early == receipts.Accepted(applied=0, pending=2, ignored=0)
    assert set(states(sessions, batch_id).values()) == {R.SENDING}

    record(sessions, settings, batch_id, [first, second], Carrier())

    with sessions() as session:
        rows = {
            r.id: r
            for r in session.scalars(select(Recipient).where(Recipient.batch_id == batch_id))
        }
    assert rows[first.id].status == R.DELIVERED
    assert (rows[second.id].status, rows[second.id].error_code) == (R.FAILED, "EC21")
    assert rows[first.id].provider == "carrier"
    assert event_trail(sessions, first.id) == ["queued", "sent", "delivered"]
    assert event_trail(sessions, second.id) == ["queued", "sent", "failed"]
    assert pending(sessions, ref_of(first.id)) == pending(sessions, ref_of(second.id)) == 0


def test_a_stored_receipt_waits_for_its_own_provider(
    sessions: sessionmaker[Session], settings: Settings, tenant: Tenant
) -> None:
    batch_id, (row,) = claimed_batch(sessions, settings, tenant, count=1)
    accept(sessions, "someone-else", receipts.Receipt(ref_of(row.id), "failed"))
    record(sessions, settings, batch_id, [row], Carrier("carrier"))
    assert states(sessions, batch_id)[row.to] == R.SENT
    assert pending(sessions, ref_of(row.id)) == 1
    # Once sent, a receipt from another provider with the same id does not apply either.
    reply = accept(sessions, "someone-else", receipts.Receipt(ref_of(row.id), "delivered"))
    assert (reply.applied, states(sessions, batch_id)[row.to]) == (0, R.SENT)
    assert accept(sessions, "carrier", receipts.Receipt(ref_of(row.id), "delivered")).applied == 1


def test_reclaim_applies_a_receipt_that_came_before_the_worker_died(
    sessions: sessionmaker[Session], settings: Settings, tenant: Tenant
) -> None:
    end_leftover_claims(sessions)
    now = utcnow()
    lost = now - timedelta(seconds=settings.send_lease + 1)
    batch_id, (row, other) = claimed_batch(sessions, settings, tenant, claimed_at=lost)
    accept(sessions, "carrier", receipts.Receipt(ref_of(row.id), "delivered"))
    with transaction(sessions) as session:
        counts = sending.reclaim_stale(
            session=session, settings=settings, providers={"sms": Carrier()}, now=now
        )
    assert counts == {"accepted": 2}
    assert states(sessions, batch_id) == {row.to: R.DELIVERED, other.to: R.SENT}
    assert event_trail(sessions, row.id) == ["queued", "sent", "delivered"]
    assert pending(sessions, ref_of(row.id)) == 0


def test_reclaim_that_cannot_look_up_makes_the_outcome_unknown(
    sessions: sessionmaker[Session], settings: Settings, tenant: Tenant
) -> None:
    now = utcnow()
    lost = now - timedelta(seconds=settings.send_lease + 1)
    batch_id, (row, _) = claimed_batch(sessions, settings, tenant, claimed_at=lost)
    with transaction(sessions) as session:
        sending.reclaim_stale(
            session=session,
            settings=settings,
            providers={"sms": Carrier(found=Lookup.UNKNOWN)},
            now=now,
        )
    assert set(states(sessions, batch_id).values()) == {R.UNKNOWN}
    assert event_trail(sessions, row.id) == ["queued", "unknown"]
    with sessions() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None and batch.status == BatchStatus.COMPLETED


def test_a_receipt_that_never_matches_is_dropped_after_the_retention_and_counted(
    sessions: sessionmaker[Session], settings: Settings, tenant: Tenant
) -> None:
    ref = f"orphan-{tenant.id}"
    received = utcnow()
    accept(sessions, "carrier", receipts.Receipt(ref, "delivered"), now=received)
    with transaction(sessions) as session:
        receipts.sweep(
            session=session,
            settings=settings,
            now=received + timedelta(seconds=settings.receipt_retention - 1),
        )
    assert pending(sessions, ref) == 1  # (other tests' older receipts may go: one database)
    with transaction(sessions) as session:
        swept = receipts.sweep(
            session=session,
            settings=settings,
            now=received + timedelta(seconds=settings.receipt_retention + 1),
        )
    assert swept.dropped >= 1 and swept.as_dict()["dropped"] == swept.dropped
    assert pending(sessions, ref) == 0


def test_the_sweep_applies_a_stored_receipt_whose_message_was_recorded_meanwhile(
    sessions: sessionmaker[Session], settings: Settings, tenant: Tenant
) -> None:
    """On PostgreSQL a receipt and its record can commit side by side, each unseen by the other."""
    batch_id, (row,) = claimed_batch(sessions, settings, tenant, count=1)
    with transaction(sessions) as session:
        stored_while_recorded(session, row, receipt="delivered")
    with transaction(sessions) as session:
        swept = receipts.sweep(session=session, settings=settings, now=utcnow())
    assert swept.applied >= 1
    assert states(sessions, batch_id)[row.to] == R.DELIVERED
    assert pending(sessions, ref_of(row.id)) == 0


def test_one_sweep_applies_every_late_match_group_after_group(
    sessions: sessionmaker[Session], settings: Settings, tenant: Tenant
) -> None:
    """A burst of such races (a loaded PostgreSQL) goes in one sweep, not a group per run."""
    batch_id, rows = claimed_batch(sessions, settings, tenant, count=7)
    with transaction(sessions) as session:
        for row in rows:
            stored_while_recorded(session, row, receipt="delivered")
    with transaction(sessions) as session:
        swept = receipts.sweep(session=session, settings=settings, now=utcnow(), limit=3)
    assert swept.applied >= 7
    assert set(states(sessions, batch_id).values()) == {R.DELIVERED}
    assert all(pending(sessions, ref_of(row.id)) == 0 for row in rows)


def test_a_receipt_whose_outcome_commits_while_it_is_applied_is_kept_not_ignored(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL: the record commits after accept's UPDATE took its snapshot, before its lookup."""
    if settings.database_url.startswith("sqlite"):
        pytest.skip("SQLite serialises writers: a record cannot commit inside accept")
    batch_id, (row,) = claimed_batch(sessions, settings, tenant, count=1)
    real = receipts._apply_chains
    recorded: list[bool] = []

    def then_recorded(**kwargs: Any) -> tuple[int, set[str]]:
        out = real(**kwargs)
        if not recorded:
            recorded.append(True)
            record(sessions, settings, batch_id, [row], Carrier())  # its own transaction
        return out

    monkeypatch.setattr(receipts, "_apply_chains", then_recorded)
    got = accept(sessions, "carrier", receipts.Receipt(ref_of(row.id), "delivered"))
    monkeypatch.undo()
    assert recorded
    assert got == receipts.Accepted(applied=0, pending=1, ignored=0)
    assert states(sessions, batch_id)[row.to] == R.SENT
    with transaction(sessions) as session:
        assert receipts.sweep(session=session, settings=settings, now=utcnow()).applied == 1
    assert states(sessions, batch_id)[row.to] == R.DELIVERED
    assert pending(sessions, ref_of(row.id)) == 0


def test_no_receipt_by_the_deadline_makes_it_unknown_and_the_sinch_summary_fires(
    sessions: sessionmaker[Session], settings: Settings, tenant: Tenant
) -> None:
    batch_id, rows = claimed_batch(
        sessions, settings, tenant, dialect="sinch", options={"delivery_report": "summary"}
    )
    record(sessions, settings, batch_id, rows, Carrier())
    delivered, silent = rows
    accept(sessions, "carrier", receipts.Receipt(ref_of(delivered.id), "delivered"))
    with sessions() as session:
        assert session.get(Batch, batch_id).status == BatchStatus.COMPLETED  # type: ignore[union-attr]
        assert not session.scalars(select(Callback).where(Callback.batch_id == batch_id)).all()
    sent_at = utcnow()
    with transaction(sessions) as session:
        receipts.sweep(
            session=session,
            settings=settings,
            now=sent_at + timedelta(seconds=settings.receipt_deadline - 5),
        )
    assert states(sessions, batch_id)[silent.to] == R.SENT
    with transaction(sessions) as session:
        swept = receipts.sweep(
            session=session,
            settings=settings,
            now=sent_at + timedelta(seconds=settings.receipt_deadline + 1),
        )
    # The database is shared with other tests: their old `sent` rows may be swept too.
    assert swept.unknown >= 1
    assert states(sessions, batch_id) == {delivered.to: R.DELIVERED, silent.to: R.UNKNOWN}
    assert event_trail(sessions, silent.id) == ["queued", "sent", "unknown"]
    with sessions() as session:
        row = session.get(Recipient, silent.id)
        assert row is not None and row.error_code == "no_receipt"
        (report,) = session.scalars(select(Callback).where(Callback.batch_id == batch_id)).all()
    statuses = {(s["status"], s["code"]): s["count"] for s in report.payload["statuses"]}
    assert statuses == {("Delivered", 0): 1, ("Unknown", 0): 1}
    # A receipt after the deadline cannot change a final status.
    late = accept(sessions, "carrier", receipts.Receipt(ref_of(silent.id), "delivered"))
    assert late == receipts.Accepted(applied=0, pending=0, ignored=1)
    assert states(sessions, batch_id)[silent.to] == R.UNKNOWN
