"""Wake-ups for held receipts (dispatcher/receipts/wake.py), on real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC

import pytest
import redis

from dispatcher import outbox
from dispatcher.outbox import TaskName
from dispatcher.receipts.wake import EXPIRES, HORIZON, SLOT, ReceiptWaker
from tests.helpers import RecordingPublisher, free_port

NOW = 1_800_000_000.0


@pytest.fixture()
def client(redis_url: str) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_url)
    for key in r.scan_iter("dispatcher:receipts:wake:*"):
        r.delete(key)
    yield r
    r.close()


def waker(client: redis.Redis, publisher: outbox.Publisher) -> ReceiptWaker:
    return ReceiptWaker(client, publisher, clock=lambda: NOW)


def wake_ups(publisher: RecordingPublisher) -> list[outbox.Message]:
    found = [m for m in publisher.messages if isinstance(m, outbox.Message)]
    assert all(m.task is TaskName.SIMULATOR_RECEIPTS and not m.kwargs for m in found)
    return found


def test_receipts_due_in_one_slot_share_one_wake_up_at_its_end(client: redis.Redis) -> None:
    publisher = RecordingPublisher()
    w = waker(client, publisher)
    w.at(NOW + 0.21)
    w.at(NOW + 0.21)
    w.at(NOW + 0.21 + SLOT / 10)  # another hand-off group, due in the same slot
    (first,) = wake_ups(publisher)
    assert first.eta is not None
    wake = first.eta.replace(tzinfo=UTC).timestamp()
    assert NOW + 0.21 <= wake < NOW + 0.21 + SLOT + 1e-3
    assert first.expires == pytest.approx(wake - NOW + EXPIRES)
    # Another process, due in a later slot: a wake-up of its own.
    ReceiptWaker(client, publisher, clock=lambda: NOW).at(NOW + 0.21 + 2 * SLOT)
    assert len(wake_ups(publisher)) == 2


def test_receipts_already_due_are_asked_for_at_once(client: redis.Redis) -> None:
    publisher = RecordingPublisher()
    w = waker(client, publisher)
    w.at(NOW - 5)  # read by the SMPP connector a moment ago, or overdue
    w.at(NOW)
    (now,) = wake_ups(publisher)
    assert now.eta is None and now.expires == pytest.approx(EXPIRES, abs=SLOT)


def test_a_broken_redis_or_broker_never_reaches_the_caller(client: redis.Redis) -> None:
    publisher = RecordingPublisher()
    down = redis.Redis(port=free_port(), socket_connect_timeout=1)
    ReceiptWaker(down, publisher, clock=lambda: NOW).at(NOW + 1)
    assert publisher.messages == []  # beat's periodic run applies the receipts

    class Failing:
        def publish(self, messages: list[outbox.Message | outbox.Revoke]) -> None:
            raise ConnectionError("broker down")

    waker(client, Failing()).at(NOW + 1)  # logged, not raised
    # The failed publisher freed its slot: the next group due then publishes the wake-up.
    waker(client, publisher).at(NOW + 1)
    assert len(wake_ups(publisher)) == 1


def test_receipts_due_beyond_the_horizon_are_left_to_beat(client: redis.Redis) -> None:
    """A wake-up is an ETA task, which Celery holds in every worker's memory until it is
    due (and Redis re-delivers past the visibility timeout): a simulator configured with
    a long receipt delay would pile one up per slot. Receipts due that far off are
    applied by beat's run (every second) instead."""
    publisher = RecordingPublisher()
    w = waker(client, publisher)
    w.at(NOW + HORIZON + 1)
    w.at(NOW + 2 * 3600)
    assert publisher.messages == []
    assert list(client.scan_iter("dispatcher:receipts:wake:*")) == []
    w.at(NOW + HORIZON - 1)  # near enough: a wake-up
    assert len(wake_ups(publisher)) == 1
