"""The batch and recipient state machines: legal moves, illegal ones, and final states."""

from __future__ import annotations

from collections.abc import Mapping
from itertools import product
from typing import Any

import pytest

from dispatcher.states import (
    BATCH_TRANSITIONS,
    CANCELLABLE_RECIPIENT,
    FINAL_RECIPIENT,
    OPEN_BATCH,
    RECIPIENT_TRANSITIONS,
    BatchStatus,
    IllegalTransition,
    RecipientStatus,
    batch_guard,
    batch_sources,
    check_batch,
    check_recipient,
    guard,
    recipient_sources,
)

B, R = BatchStatus, RecipientStatus

# docs/architecture.md "States", written out edge by edge.
BATCH_LEGAL = {
    (B.SCHEDULED, B.QUEUED),
    (B.QUEUED, B.SENDING),
    (B.SENDING, B.COMPLETED),
    (B.SCHEDULED, B.CANCELLED),
    (B.QUEUED, B.CANCELLED),
    (B.SENDING, B.CANCELLED),
    (B.SCHEDULED, B.EXPIRED),
    (B.QUEUED, B.EXPIRED),
    (B.SENDING, B.EXPIRED),
}
RECIPIENT_LEGAL = {
    (R.SCHEDULED, R.QUEUED),
    (R.QUEUED, R.SENDING),
    (R.SENDING, R.SENT),
    (R.SENT, R.DELIVERED),
    (R.SENT, R.FAILED),
    (R.SENT, R.EXPIRED),
    (R.SCHEDULED, R.CANCELLED),
    (R.QUEUED, R.CANCELLED),
}
BATCH_FINAL = {B.COMPLETED, B.CANCELLED, B.EXPIRED}
RECIPIENT_FINAL = {
    R.DELIVERED,
    R.FAILED,
    R.EXPIRED,
    R.CANCELLED,
    R.REJECTED,
    R.UNKNOWN,
    R.READ,
}


def edges(table: Mapping[Any, frozenset[Any]]) -> set[tuple[Any, Any]]:
    return {(a, b) for a, targets in table.items() for b in targets}


def test_every_status_has_a_row() -> None:
    assert set(BATCH_TRANSITIONS) == set(BatchStatus)
    assert set(RECIPIENT_TRANSITIONS) == set(RecipientStatus)
    for table, kind in ((BATCH_TRANSITIONS, BatchStatus), (RECIPIENT_TRANSITIONS, RecipientStatus)):
        for targets in table.values():
            assert all(isinstance(t, kind) for t in targets)


def test_the_designed_moves_are_allowed() -> None:
    assert edges(BATCH_TRANSITIONS) >= BATCH_LEGAL
    assert edges(RECIPIENT_TRANSITIONS) >= RECIPIENT_LEGAL
    for current, new in BATCH_LEGAL:
        assert check_batch(current, new) is new
    for r_current, r_new in RECIPIENT_LEGAL:
        assert check_recipient(r_current, r_new) is r_new


def test_extra_moves_are_only_the_documented_ones() -> None:
    # Beyond the plain lifecycle: a batch whose send_at moved past the horizon, a batch the
    # dispatcher starts directly, a transient failure or fallback re-queuing a
    # recipient, every channel refused before a send, a send that times out, and
    # the outcome unknown: no receipt by the deadline, or a lost hand-off nobody can look up.
    assert edges(BATCH_TRANSITIONS) - BATCH_LEGAL == {
        (B.QUEUED, B.SCHEDULED),
        (B.SCHEDULED, B.SENDING),
        # A late channel failure re-opens a completed batch for the recipient's next channel.
        (B.COMPLETED, B.SENDING),
    }
    assert edges(RECIPIENT_TRANSITIONS) - RECIPIENT_LEGAL == {
        (R.SCHEDULED, R.EXPIRED),
        (R.QUEUED, R.EXPIRED),
        (R.QUEUED, R.FAILED),
        (R.SENDING, R.QUEUED),
        (R.SENDING, R.FAILED),
        (R.SENDING, R.EXPIRED),
        (R.SENDING, R.UNKNOWN),
        (R.SENT, R.UNKNOWN),
        # A channel that reports reading (RCS, WhatsApp): after delivered, or overtaking it.
        (R.SENT, R.READ),
        (R.DELIVERED, R.READ),
        # The channel's webhook says it could not carry a sent message: its next channel.
        (R.SENT, R.QUEUED),
    }


def test_finals_have_no_exits() -> None:
    # Completed is final unless a late channel failure re-opens it for a fallback.
    assert {s for s, nxt in BATCH_TRANSITIONS.items() if not nxt} == BATCH_FINAL - {B.COMPLETED}
    assert BATCH_TRANSITIONS[B.COMPLETED] == {B.SENDING}
    # Delivered is final for its batch; its one way on is to read.
    assert {s for s, nxt in RECIPIENT_TRANSITIONS.items() if not nxt} == RECIPIENT_FINAL - {
        R.DELIVERED
    }
    assert RECIPIENT_TRANSITIONS[R.DELIVERED] == {R.READ}
    assert FINAL_RECIPIENT == RECIPIENT_FINAL
    for final, target in product(BATCH_FINAL, BatchStatus):
        if (final, target) == (B.COMPLETED, B.SENDING):
            continue
        with pytest.raises(IllegalTransition):
            check_batch(final, target)
    for r_final, r_target in product(RECIPIENT_FINAL, RecipientStatus):
        if (r_final, r_target) == (R.DELIVERED, R.READ):
            continue
        with pytest.raises(IllegalTransition):
            check_recipient(r_final, r_target)


def test_every_pair_is_decided_by_the_table() -> None:
    for current, new in product(BatchStatus, BatchStatus):
        if new in BATCH_TRANSITIONS[current]:
            assert check_batch(current, new) is new
        else:
            with pytest.raises(IllegalTransition, match=f"{current} -> {new}"):
                check_batch(current, new)
    for r_current, r_new in product(RecipientStatus, RecipientStatus):
        if r_new in RECIPIENT_TRANSITIONS[r_current]:
            assert check_recipient(r_current, r_new) is r_new
        else:
            with pytest.raises(IllegalTransition, match=f"{r_current} -> {r_new}"):
                check_recipient(r_current, r_new)


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (R.SENDING, R.CANCELLED),  # claimed by a worker: cancel can no longer stop it
        (R.SENT, R.CANCELLED),
        (R.SENT, R.SENDING),  # never sent twice
        (R.DELIVERED, R.FAILED),
        (R.CANCELLED, R.QUEUED),
        (R.SCHEDULED, R.SENDING),  # claims take queued rows only
        (R.SCHEDULED, R.SENT),
        (R.QUEUED, R.SENT),
        (R.REJECTED, R.QUEUED),
    ],
)
def test_illegal_recipient_moves(current: RecipientStatus, new: RecipientStatus) -> None:
    with pytest.raises(IllegalTransition):
        check_recipient(current, new)


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (B.COMPLETED, B.CANCELLED),
        (B.CANCELLED, B.QUEUED),
        (B.EXPIRED, B.SENDING),
        (B.SENDING, B.QUEUED),
        (B.SENDING, B.SCHEDULED),
        (B.SCHEDULED, B.COMPLETED),
    ],
)
def test_illegal_batch_moves(current: BatchStatus, new: BatchStatus) -> None:
    with pytest.raises(IllegalTransition):
        check_batch(current, new)


def test_no_status_moves_to_itself() -> None:
    for table in (BATCH_TRANSITIONS, RECIPIENT_TRANSITIONS):
        assert all(status not in targets for status, targets in table.items())


def test_sources_invert_the_tables() -> None:
    for new in BatchStatus:
        assert set(batch_sources(new)) == {s for s, nxt in BATCH_TRANSITIONS.items() if new in nxt}
    for r_new in RecipientStatus:
        expected = {s for s, nxt in RECIPIENT_TRANSITIONS.items() if r_new in nxt}
        assert set(recipient_sources(r_new)) == expected
    # Cancel is one conditional UPDATE over exactly the unclaimed recipients.
    assert set(recipient_sources(R.CANCELLED)) == CANCELLABLE_RECIPIENT == {R.SCHEDULED, R.QUEUED}
    assert set(batch_sources(B.CANCELLED)) == OPEN_BATCH
    assert batch_sources(B.SCHEDULED) == (B.QUEUED,)


def reachable(table: Mapping[Any, frozenset[Any]], start: object) -> set[Any]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in table[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_open_status_can_still_end() -> None:
    for status in BatchStatus:
        assert reachable(BATCH_TRANSITIONS, status) & BATCH_FINAL, status
    for r_status in RecipientStatus:
        assert reachable(RECIPIENT_TRANSITIONS, r_status) & RECIPIENT_FINAL, r_status


def test_everything_but_rejected_is_reachable_from_scheduled() -> None:
    assert reachable(BATCH_TRANSITIONS, B.SCHEDULED) == set(BatchStatus)
    # rejected is decided at intake, never reached by a transition.
    assert reachable(RECIPIENT_TRANSITIONS, R.SCHEDULED) == set(RecipientStatus) - {R.REJECTED}
    assert recipient_sources(R.REJECTED) == ()


def test_statuses_are_their_wire_names() -> None:
    assert [s.value for s in BatchStatus] == [
        "scheduled",
        "queued",
        "sending",
        "completed",
        "cancelled",
        "expired",
    ]
    assert RecipientStatus("delivered") is R.DELIVERED
    assert f"{R.SENT}" == "sent"


def test_a_guard_is_every_allowed_source_or_a_checked_subset() -> None:
    assert guard(R.UNKNOWN) == recipient_sources(R.UNKNOWN) == (R.SENDING, R.SENT)
    assert guard(R.DELIVERED, [R.SENT]) == (R.SENT,)
    assert batch_guard(B.COMPLETED) == (B.SENDING,)
    with pytest.raises(IllegalTransition, match="queued -> sent"):
        guard(R.SENT, [R.SENDING, R.QUEUED])
    with pytest.raises(IllegalTransition, match="completed -> cancelled"):
        batch_guard(B.CANCELLED, [B.COMPLETED])
