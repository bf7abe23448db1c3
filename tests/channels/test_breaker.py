"""A vendor API that stops answering costs a few timeouts, not one per message."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests

from dispatcher import metrics
from dispatcher.channels.base import OutboundMessage, Outcome, SendResult
from dispatcher.channels.breaker import Breaker
from dispatcher.channels.twilio import TwilioProvider
from tests.helpers.mute import MuteApi
from tests.standins.twilio import Twilio

SID = "AC" + "0123456789abcdef" * 2
TOKEN = "twilio-auth-token-0123456789abcdef"


@pytest.fixture()
def silent() -> Iterator[MuteApi]:
    server = MuteApi()
    yield server
    server.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def message(rid: str = "r1") -> OutboundMessage:
    return OutboundMessage(rid, "sms", "+447700900001", "+15005550006", "hello")


def provider(api_url: str, breaker: Breaker, read_timeout: float = 10) -> TwilioProvider:
    return TwilioProvider(
        account_sid=SID,
        auth_token=TOKEN,
        api_url=api_url,
        session=requests.Session(),
        timeout=(3, read_timeout),
        breaker=breaker,
    )


def test_a_hung_api_is_called_three_times_then_not_until_the_pause_ends(
    silent: MuteApi,
) -> None:
    clock = Clock()
    hung = provider(silent.url, Breaker(clock=clock), read_timeout=0.3)
    started = time.monotonic()
    results = [hung.send(message(f"r{i}")) for i in range(20)]
    # Before: 20 read timeouts in a row (200 s at the default 10 s timeout).
    assert time.monotonic() - started < 20 * 0.3
    assert len(silent.accepted) == 3
    # The three timed out after the request went out: Twilio may have taken them.
    lost = {(r.outcome, r.error_code) for r in results[:3]}
    assert lost == {(Outcome.UNKNOWN, "outcome_unknown")}
    assert {(r.outcome, r.error_code) for r in results[3:]} == {(Outcome.TRANSIENT, "network")}
    paused = results[3]
    assert paused.error_text == "not sent: the API failed 3 times in a row; paused"
    assert paused.retry_after == pytest.approx(30.0)


def api_up() -> float | None:
    """The twilio API's carrier-connection gauge as a scrape shows it (None: never set)."""
    for line in metrics.exposition()[0].decode().splitlines():
        if line.startswith("dispatcher_carrier_connection_up{") and 'provider="twilio"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_the_carrier_connection_gauge_shows_the_api_paused_then_back(silent: MuteApi) -> None:
    clock = Clock()
    breaker = Breaker(clock=clock)
    hung = provider(silent.url, breaker, read_timeout=0.2)
    for i in range(3):
        hung.send(message(f"r{i}"))
    # DispatcherCarrierConnectionDown fires on this after a minute.
    assert api_up() == 0
    clock.now += 30
    with Twilio(account_sid=SID, auth_token=TOKEN) as twilio:
        up = provider(twilio.url, breaker)
        assert up.send(message("probe")).outcome is Outcome.ACCEPTED
    assert api_up() == 1


def test_after_the_pause_one_message_probes_and_an_answer_closes_it() -> None:
    clock = Clock()
    breaker = Breaker(clock=clock)
    down = SendResult(Outcome.TRANSIENT, error_code="network", error_text="ConnectError")
    for _ in range(3):
        assert breaker.refused() is None
        breaker.record(down)
    clock.now += 10
    refused = breaker.refused()
    assert refused is not None and refused.retry_after == pytest.approx(20.0)
    clock.now += 20
    assert breaker.refused() is None  # the probe
    assert breaker.refused() is not None  # the others wait for its answer
    breaker.record(SendResult(Outcome.RECIPIENT, error_code="twilio_21211"))
    assert breaker.refused() is None
    assert breaker.refused() is None


def test_a_failed_probe_pauses_again() -> None:
    clock = Clock()
    breaker = Breaker(clock=clock)
    down = SendResult(Outcome.TRANSIENT, error_code="network", error_text="ReadTimeout")
    for _ in range(3):
        breaker.record(down)
    clock.now += 30
    assert breaker.refused() is None
    breaker.record(down)
    refused = breaker.refused()
    assert refused is not None and refused.retry_after == pytest.approx(30.0)


def test_timeouts_after_the_request_count_as_no_answer() -> None:
    breaker = Breaker(clock=Clock())
    for _ in range(3):
        breaker.record(SendResult(Outcome.UNKNOWN, error_code="outcome_unknown"))
    assert breaker.refused() is not None


def test_failures_that_are_answers_never_pause_sending() -> None:
    breaker = Breaker(clock=Clock())
    for code in ("twilio_20003", "twilio_503", "network", "network", "twilio_21211"):
        breaker.record(SendResult(Outcome.TRANSIENT, error_code=code))
        assert breaker.refused() is None


def test_an_api_back_before_the_third_failure_keeps_everything_flowing() -> None:
    clock = Clock()
    breaker = Breaker(clock=clock)
    with Twilio(account_sid=SID, auth_token=TOKEN) as twilio:
        up = provider(twilio.url, breaker)
        breaker.record(SendResult(Outcome.TRANSIENT, error_code="network"))
        breaker.record(SendResult(Outcome.TRANSIENT, error_code="network"))
        assert up.send(message()).outcome is Outcome.ACCEPTED
        breaker.record(SendResult(Outcome.TRANSIENT, error_code="network"))
        assert up.send(message("r2")).outcome is Outcome.ACCEPTED
