"""Callback URLs at intake: a client's host names cannot hold an API worker on DNS.

The resolver is the edge of the world here (a stand-in for a client's DNS zone):
the intake check asks it about each host once per request, within one bound
(``callback_resolve_timeout``), and a host it cannot answer in time is accepted
like one that does not resolve (the sender checks every address before each POST).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from dispatcher import netsafety
from dispatcher.config import Settings
from dispatcher.runtime import Runtime
from tests.factories import Tenant
from tests.helpers import RecordingPublisher
from tests.helpers.mplus import minimum

# How long the slow zone takes to answer: far past the bound, short enough to end.
SLOW = 3.0


class Zone:
    """A stand-in DNS: names under ``slow.test`` answer after SLOW seconds, others at once."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.released = threading.Event()

    def resolve(self, host: str) -> list[str]:
        self.asked.append(host)
        if host.endswith("slow.test"):
            self.released.wait(SLOW)
        if host.startswith("private."):
            return ["10.0.0.7"]
        return ["93.184.216.34"]


@pytest.fixture()
def zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[Zone]:
    stand_in = Zone()
    monkeypatch.setattr(netsafety, "default_resolve", stand_in.resolve)
    yield stand_in
    stand_in.released.set()


@pytest.fixture()
def api(settings: Settings) -> Iterator[FlaskClient]:
    """The API with a short DNS bound."""
    rt = Runtime(settings.replace(callback_resolve_timeout=0.2), RecordingPublisher())
    try:
        yield create_app(rt.settings, runtime=rt).test_client()
    finally:
        rt.dispose()


def message(n: int, callback: str) -> dict[str, object]:
    return {"from": {"type": "shared"}, "to": f"4477009{n:05d}", "body": "b", "callback": callback}


def test_a_host_that_answers_slowly_is_accepted_within_the_bound(
    api: FlaskClient, zone: Zone, sessions: sessionmaker[Session]
) -> None:
    tenant = Tenant(sessions)
    started = time.monotonic()
    reply = api.post("/batch", json=minimum(callback="http://a.slow.test/cb"), headers=tenant.auth)
    assert reply.status_code == 200, reply.get_data(as_text=True)
    assert time.monotonic() - started < SLOW, "the request waited for the slow DNS answer"


def test_one_request_waits_for_dns_once_whatever_its_hosts(
    api: FlaskClient, zone: Zone, sessions: sessionmaker[Session]
) -> None:
    tenant = Tenant(sessions)
    body = {"messages": [message(n, f"http://h{n}.slow.test/cb") for n in range(5)]}
    started = time.monotonic()
    reply = api.post("/message", json=body, headers=tenant.auth)
    assert reply.status_code == 200, reply.get_data(as_text=True)
    # Five slow hosts, one bound: not five times the slow answer, nor five bounds.
    assert time.monotonic() - started < SLOW
    assert len(zone.asked) == 1


def test_a_host_is_asked_once_per_request_and_a_private_answer_still_refused(
    api: FlaskClient, zone: Zone, sessions: sessionmaker[Session]
) -> None:
    tenant = Tenant(sessions)
    same = {"messages": [message(n, "http://fast.test/cb") for n in range(20)]}
    assert api.post("/message", json=same, headers=tenant.auth).status_code == 200
    assert zone.asked == ["fast.test"]
    refused = api.post(
        "/batch", json=minimum(callback="http://private.fast.test/cb"), headers=tenant.auth
    )
    assert refused.status_code == 400
    assert "callback" in refused.get_json()["message"]
    assert "10.0.0.7" not in refused.get_data(as_text=True)


def test_a_spent_dns_bound_does_not_let_a_localhost_name_in(
    api: FlaskClient, zone: Zone, sessions: sessionmaker[Session]
) -> None:
    tenant = Tenant(sessions)
    body = {
        "messages": [
            message(0, "http://first.slow.test/cb"),
            message(1, "http://api.localhost:8080/admin"),
        ]
    }
    refused = api.post("/message", json=body, headers=tenant.auth)
    assert refused.status_code == 400
    assert "messages.1.callback" in refused.get_json()["message"]
    assert "loopback" in refused.get_json()["message"]
