"""A stopping process's callback lanes (delivery.drain): the POSTs in flight are waited
for, a bounded time, and recorded; none is started after. Against SQLite/PostgreSQL,
real Redis and the real receiver of test_delivery.py."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from dispatcher.webhooks import delivery
from dispatcher.webhooks.deliver import WebhookSender
from tests.helpers import wait_for
from tests.webhooks import test_delivery as base
from tests.webhooks.test_delivery import WAIT, Env, Receiver, add_callback

# test_delivery's fixtures: the database per backend, the receiver, the sender.
env, receiver, sender = base.env, base.receiver, base.sender


@pytest.fixture(autouse=True)
def running(monkeypatch: pytest.MonkeyPatch) -> delivery._Running:
    """This test's own record of running lanes: a drain stops new POSTs for good."""
    fresh = delivery._Running()
    monkeypatch.setattr(delivery, "_running", fresh)
    return fresh


@pytest.fixture
def one_slot(env: Env, redis_url: str) -> Iterator[Env]:
    """``env`` where a task waits a tenth of a second for its lanes, and an endpoint
    takes one POST at a time (its callbacks go out one after the other)."""
    settings = env.settings.replace(callback_task_wait=0.1, callback_endpoint_concurrency=1)
    client = redis.Redis.from_url(redis_url)
    try:
        gate = delivery.gate_for(redis_client=client, settings=settings)
        yield dataclasses.replace(env, settings=settings, gate=gate)
    finally:
        client.close()


def test_a_drain_waits_for_the_post_in_flight_records_it_and_starts_no_other(
    one_slot: Env, receiver: Receiver, sender: WebhookSender, running: delivery._Running
) -> None:
    env = one_slot
    first, second = (add_callback(env, receiver.url("/slow")) for _ in range(2))
    # The receiver holds the first POST: the task stops waiting and leaves both in flight.
    assert env.deliver(sender, first, second) == {"in_flight": 2}
    assert receiver.arrived.is_set()

    drain = threading.Thread(target=delivery.drain, kwargs={"seconds": WAIT})
    drain.start()
    wait_for(running.stopping.is_set, timeout=WAIT)
    receiver.release.set()  # the first gets its answer while the process stops
    drain.join(timeout=2 * WAIT)

    assert not drain.is_alive()
    assert (env.get(first).state, env.get(first).attempts) == ("delivered", 1)
    # Never POSTed: back to pending, unattempted, for the next worker.
    assert (env.get(second).state, env.get(second).attempts) == ("pending", 0)
    assert len(receiver.requests("/slow")) == 1


def test_a_drain_leaves_what_is_unanswered_at_its_bound_to_the_lease(
    one_slot: Env, receiver: Receiver, sender: WebhookSender
) -> None:
    env = one_slot
    held = add_callback(env, receiver.url("/slow"))
    assert env.deliver(sender, held) == {"in_flight": 1}

    started = time.monotonic()
    delivery.drain(seconds=0.2)

    assert time.monotonic() - started < WAIT  # bounded: it did not wait for the answer
    assert (env.get(held).state, env.get(held).attempts) == ("delivering", 1)
    receiver.release.set()
