"""The http provider against a real carrier stand-in on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from dispatcher.channels.base import OutboundMessage, Outcome
from dispatcher.channels.http import HttpProvider


class Carrier(BaseHTTPRequestHandler):
    """Answers by the recipient number, so each test picks the reply it needs."""

    replies: dict[str, tuple[int, dict[str, Any] | None, dict[str, str]]] = {}
    seen: list[tuple[dict[str, Any], dict[str, str]]] = []
    release = threading.Event()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((body, dict(self.headers)))
        if body["to"] == "+15550000000":
            self.release.wait(5)
        status, reply, headers = self.replies.get(body["to"], (200, {"id": "c-1"}, {}))
        data = json.dumps(reply).encode() if reply is not None else b"not json"
        # The held reply's client has timed out and gone: its answer meets a closed socket
        # (socketserver would print the traceback into the test run's output).
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture()
def carrier() -> Iterator[str]:
    Carrier.seen.clear()
    Carrier.release.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Carrier)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/send"
    Carrier.release.set()
    server.shutdown()
    server.server_close()


def message(to: str) -> OutboundMessage:
    return OutboundMessage(recipient_id="r1", channel="sms", to=to, sender="Acme", body="hi")


@pytest.mark.parametrize(
    ("status", "reply", "outcome"),
    [
        (200, {"id": "carrier-42"}, Outcome.ACCEPTED),
        (202, {"message_id": "carrier-43"}, Outcome.ACCEPTED),
        (429, {"error": {"message": "slow down"}}, Outcome.TRANSIENT),
        (503, None, Outcome.TRANSIENT),
        (404, {"error": {"message": "not on this channel"}}, Outcome.CHANNEL),
        (410, None, Outcome.CHANNEL),
        (400, {"error": {"message": "bad number"}}, Outcome.RECIPIENT),
        (400, {"error": {"class": "transient"}}, Outcome.TRANSIENT),
    ],
)
def test_replies_map_to_the_three_failure_classes(
    carrier: str, status: int, reply: dict[str, Any] | None, outcome: Outcome
) -> None:
    Carrier.replies = {"+447700900001": (status, reply, {"Retry-After": "7"})}
    result = HttpProvider(url=carrier, token="t0k").send(message("+447700900001"))
    assert result.outcome is outcome
    if outcome is Outcome.ACCEPTED:
        assert result.provider_message_id in {"carrier-42", "carrier-43"}
    else:
        assert result.error_code == f"http_{status}"
        assert result.retry_after == 7.0


def test_request_carries_the_message_the_idempotency_key_and_the_token(carrier: str) -> None:
    Carrier.replies = {}
    HttpProvider(url=carrier, token="t0k").send(message("+447700900002"))
    body, headers = Carrier.seen[0]
    assert body == {
        "id": "r1:sms",
        "to": "+447700900002",
        "from": "Acme",
        "body": "hi",
        "channel": "sms",
    }
    assert headers["Authorization"] == "Bearer t0k"


def test_a_timeout_is_unknown_and_a_refused_connection_transient(carrier: str) -> None:
    """A POST that timed out may have been taken: final ``unknown``, never sent again (at
    most once per recipient and channel). A connection never made sent nothing."""
    slow = HttpProvider(url=carrier, read_timeout=0.2).send(message("+15550000000"))
    assert (slow.outcome, slow.error_code) == (Outcome.UNKNOWN, "outcome_unknown")
    assert slow.error_text == (
        "ReadTimeout after the request was sent; not re-sent to avoid a duplicate"
    )
    closed = HttpProvider(url="http://127.0.0.1:9/", connect_timeout=0.5).send(message("+1555"))
    assert closed.outcome is Outcome.TRANSIENT
    # Named by its kind only, as every HTTP provider does (the URL is the operator's).
    assert (closed.error_code, closed.error_text) == ("network", "ConnectionError")


def test_a_carrier_that_stops_answering_is_paused_after_three_timeouts(carrier: str) -> None:
    hung = HttpProvider(url=carrier, read_timeout=0.2)
    # The carrier holds this number's POSTs until the test ends.
    results = [hung.send(message("+15550000000")) for _ in range(6)]
    assert len(Carrier.seen) == 3
    assert [r.error_code for r in results] == ["outcome_unknown"] * 3 + ["network"] * 3
    assert [r.error_text for r in results[3:]] == [
        "not sent: the API failed 3 times in a row; paused"
    ] * 3


def test_an_http_provider_needs_a_url() -> None:
    with pytest.raises(ValueError, match="URL"):
        HttpProvider(url="")


@pytest.mark.parametrize(
    ("header", "expected"),
    [("inf", None), ("nan", None), ("1e12", 86400.0), ("-5", 0.0), ("soon", None)],
)
def test_absurd_retry_after_values_are_dropped_or_capped(
    carrier: str, header: str, expected: float | None
) -> None:
    Carrier.replies = {"+447700900003": (503, None, {"Retry-After": header})}
    result = HttpProvider(url=carrier).send(message("+447700900003"))
    assert result.outcome is Outcome.TRANSIENT
    assert result.retry_after == expected
