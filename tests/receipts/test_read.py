"""Read receipts through the durable receipts service, on SQLite and PostgreSQL.

``read`` follows ``delivered`` (or overtakes it); kept before the outcome is
recorded like any receipt, applied by settle and by the sweep, and a ``delivered``
then ``read`` in one request both apply, in that order.
"""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.receipts import service as receipts
from dispatcher.receipts.models import PendingReceipt
from dispatcher.states import RecipientStatus
from tests.factories import Tenant
from tests.helpers import receipts as helpers

R = RecipientStatus

Receipt = receipts.Receipt


def test_delivered_then_read_in_one_request_both_apply_in_order(
    sessions: sessionmaker[Session], settings: Settings, tenant: Tenant
) -> None:
    batch_id, (row, other) = helpers.claimed_batch(sessions, settings, tenant)
    helpers.record(sessions, settings, batch_id, [row, other], helpers.Carrier())
    ref = helpers.ref_of(row.id)

    reply = helpers.accept(sessions, "carrier", Receipt(ref, "delivered"), Receipt(ref, "read"))

    assert reply == receipts.Accepted(applied=2, pending=0, ignored=0)
    assert helpers.states(sessions, batch_id) == {row.to: R.READ, other.to: R.SENT}
    assert helpers.event_trail(sessions, row.id) == ["queued", "sent", "delivered", "read"]


def test_a_read_that_overtook_delivered_wins_and_the_delivered_after_it_is_ignored(
    sessions: sessionmaker[Session], settings: Settings, tenant: Tenant
) -> None:
    batch_id, (row,) = helpers.claimed_batch(sessions, settings, tenant, count=1)
    helpers.record(sessions, settings, batch_id, [row], helpers.Carrier())
    ref = helpers.ref_of(row.id)

    reply = helpers.accept(sessions, "carrier", Receipt(ref, "read"), Receipt(ref, "delivered"))

    assert reply == receipts.Accepted(applied=1, pending=0, ignored=1)
    assert helpers.event_trail(sessions, row.id) == ["queued", "sent", "read"]
    assert helpers.accept(sessions, "carrier", Receipt(ref, "read")).ignored == 1


def test_delivered_and_read_before_the_record_are_kept_and_applied_with_the_outcome(
    sessions: sessionmaker[Session], settings: Settings, tenant: Tenant
) -> None:
    batch_id, (row, other) = helpers.claimed_batch(sessions, settings, tenant)
    ref, other_ref = helpers.ref_of(row.id), helpers.ref_of(other.id)
    # A repeat, and a failure after delivered, are not kept: a carrier's word does not change.
    early = helpers.accept(
        sessions,
        "carrier",
        Receipt(ref, "delivered"),
        Receipt(ref, "delivered"),
        Receipt(ref, "failed"),
        Receipt(ref, "read"),
    )
    assert early == receipts.Accepted(applied=0, pending=2, ignored=2)
    # A read alone, in a request of its own.
    assert helpers.accept(sessions, "carrier", Receipt(other_ref, "read")).pending == 1

    helpers.record(sessions, settings, batch_id, [row, other], helpers.Carrier())

    assert helpers.states(sessions, batch_id) == {row.to: R.READ, other.to: R.READ}
    assert helpers.event_trail(sessions, row.id) == ["queued", "sent", "delivered", "read"]
    assert helpers.event_trail(sessions, other.id) == ["queued", "sent", "read"]
    assert helpers.pending(sessions, ref) == helpers.pending(sessions, other_ref) == 0


def test_the_sweep_applies_a_stored_read_to_a_sent_or_delivered_message(
    sessions: sessionmaker[Session], settings: Settings, tenant: Tenant
) -> None:
    """A read stored while its outcome committed side by side (PostgreSQL) is not lost."""
    batch_id, (sent, delivered) = helpers.claimed_batch(sessions, settings, tenant)
    with transaction(sessions) as session:
        helpers.stored_while_recorded(session, sent, receipt="read", status=R.SENT)
        helpers.stored_while_recorded(session, delivered, receipt="read", status=R.DELIVERED)

    with transaction(sessions) as session:
        swept = receipts.sweep(session=session, settings=settings, now=utcnow())

    assert swept.applied >= 2
    assert helpers.states(sessions, batch_id) == {
        sent.to: R.READ,
        delivered.to: R.READ,
    }
    assert (
        helpers.pending(sessions, helpers.ref_of(sent.id))
        == helpers.pending(sessions, helpers.ref_of(delivered.id))
        == 0
    )


def test_the_sweep_leaves_a_stored_delivered_for_a_delivered_message_to_the_retention(
    sessions: sessionmaker[Session], settings: Settings, tenant: Tenant
) -> None:
    """Only a read moves a delivered message on; a stored repeat is not applied twice."""
    batch_id, (row,) = helpers.claimed_batch(sessions, settings, tenant, count=1)
    helpers.record(sessions, settings, batch_id, [row], helpers.Carrier())
    ref = helpers.ref_of(row.id)
    helpers.accept(sessions, "carrier", Receipt(ref, "delivered"))
    with transaction(sessions) as session:
        session.add(
            PendingReceipt(
                provider="carrier",
                provider_message_id=ref,
                status="delivered",
                received_at=utcnow(),
            )
        )
    with transaction(sessions) as session:
        receipts.sweep(session=session, settings=settings, now=utcnow())
    assert helpers.event_trail(sessions, row.id) == ["queued", "sent", "delivered"]
    assert helpers.pending(sessions, ref) == 1
