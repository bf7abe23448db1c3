"""Tests for webhook delivery against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dispatcher.webhooks import sign
from dispatcher.webhooks.deliver import DeliveryResult, WebhookSender, next_delay, parse_retry_after

HUGE_SIZE = 1024 * 1024
LOCAL = ("127.0.0.1",)


@dataclass
class Received:
    """A request as seen by the test server."""

    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class ServerState:
    """Shared state between the test and the server's handler threads."""

    release: threading.Event = field(default_factory=threading.Event)
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Handler(BaseHTTPRequestHandler):
    """Routes by path to canned behaviours."""

    server: TestServer

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        """Record the request, then answer according to the path."""
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        state = self.server.state
        with state.lock:
            state.requests.append(Received(self.path, dict(self.headers.items()), body))
        try:
            if self.path == "/ok":
                self._send(200, b'{"received": true}')
            elif self.path == "/created":
                self._send(201)
            elif self.path == "/fail":
                self._send(500, b"internal boom")
            elif self.path == "/throttle":
                self._send(429, b"slow down", {"Retry-After": "7"})
            elif self.path == "/unavailable-date":
                self._send(503, b"", {"Retry-After": formatdate(0, usegmt=True)})
            elif self.path == "/redirect":
                self._send(302, b"", {"Location": "/ok"})
            elif self.path == "/slow":
                # Held until teardown so the client's read timeout must fire first.
                state.release.wait(timeout=30)
                self._send(200, b"too late")
            elif self.path == "/huge":
                self._send(200, b"x" * HUGE_SIZE)
            else:
                self._send(404)
        except OSError:
            pass  # client hung up (timeout or capped read): expected in these tests


class TestServer(ThreadingHTTPServer):
    """ThreadingHTTPServer carrying the shared test state."""

    __test__ = False
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = ServerState()


@pytest.fixture
def server() -> Iterator[TestServer]:
    srv = TestServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.state.release.set()
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


@pytest.fixture
def sender() -> Iterator[WebhookSender]:
    with WebhookSender(allow=LOCAL, connect_timeout=2.0, read_timeout=2.0) as s:
        yield s


def url(srv: TestServer, path: str) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


def paths(srv: TestServer) -> list[str]:
    with srv.state.lock:
        return [r.path for r in srv.state.requests]


def test_ok_delivery_sends_signed_json(server: TestServer, sender: WebhookSender) -> None:
    secret = sign.new_secret()
    body = b'{"event": "message.delivered"}'
    hdrs = sign.headers(secrets=[secret], msg_id="msg_1", timestamp=1700000000, body=body)

    result = sender.post(url=url(server, "/ok"), body=body, headers=hdrs)

    assert result == DeliveryResult(
        ok=True, status=200, error=None, retry_after=None, body_excerpt='{"received": true}'
    )
    [req] = server.state.requests
    assert req.body == body
    received = {k.lower(): v for k, v in req.headers.items()}
    assert received["content-type"] == "application/json"
    assert received["user-agent"] == "Dispatcher-Webhooks/1"
    sign.verify(secret=secret, headers=received, body=req.body, now=1700000000)


def test_content_type_forced_and_user_agent_configurable(server: TestServer) -> None:
    with WebhookSender(allow=LOCAL, user_agent="Custom/2") as s:
        result = s.post(
            url=url(server, "/created"), body=b"{}", headers={"content-type": "text/plain"}
        )
    assert result.ok and result.status == 201
    received = {k.lower(): v for k, v in server.state.requests[0].headers.items()}
    assert received["content-type"] == "application/json"
    assert received["user-agent"] == "Custom/2"


def test_server_error_is_failure(server: TestServer, sender: WebhookSender) -> None:
    result = sender.post(url=url(server, "/fail"), body=b"{}", headers={})
    assert result == DeliveryResult(
        ok=False, status=500, error="HTTP 500", retry_after=None, body_excerpt="internal boom"
    )


def test_429_retry_after_seconds(server: TestServer, sender: WebhookSender) -> None:
    result = sender.post(url=url(server, "/throttle"), body=b"{}", headers={})
    assert not result.ok
    assert result.status == 429
    assert result.retry_after == 7.0
    assert result.body_excerpt == "slow down"


def test_503_retry_after_http_date_in_past_is_zero(
    server: TestServer, sender: WebhookSender
) -> None:
    result = sender.post(url=url(server, "/unavailable-date"), body=b"{}", headers={})
    assert (result.ok, result.status, result.retry_after) == (False, 503, 0.0)


def test_redirect_not_followed(server: TestServer, sender: WebhookSender) -> None:
    result = sender.post(url=url(server, "/redirect"), body=b"{}", headers={})
    assert not result.ok
    assert result.status == 302
    assert (
        result.error is not None
        and "redirect not followed" in result.error
        and "/ok" in result.error
    )
    assert paths(server) == ["/redirect"]


def test_read_timeout_honoured(server: TestServer) -> None:
    with WebhookSender(allow=LOCAL, read_timeout=0.3) as s:
        result = s.post(url=url(server, "/slow"), body=b"{}", headers={})
    assert not result.ok
    assert result.status is None
    assert result.error is not None and "timed out" in result.error.lower()


def test_huge_response_capped(server: TestServer) -> None:
    with WebhookSender(allow=LOCAL, max_response_bytes=100) as s:
        result = s.post(url=url(server, "/huge"), body=b"{}", headers={})
    assert result.ok and result.status == 200
    assert result.body_excerpt == "x" * 100


def test_huge_response_default_cap(server: TestServer, sender: WebhookSender) -> None:
    result = sender.post(url=url(server, "/huge"), body=b"{}", headers={})
    assert result.ok
    assert len(result.body_excerpt) == 4096


def test_loopback_refused_without_allowlist(server: TestServer) -> None:
    with WebhookSender() as s:
        result = s.post(url=url(server, "/ok"), body=b"{}", headers={})
    assert not result.ok
    assert result.status is None
    assert result.error is not None and "unsafe URL" in result.error and "loopback" in result.error
    assert paths(server) == []


def test_dns_rechecked_at_delivery() -> None:
    answers = {"hooks.example.com": ["93.184.216.34"]}
    with WebhookSender(allow=LOCAL, resolve=lambda host: answers[host]) as s:
        answers["hooks.example.com"] = ["169.254.169.254"]
        result = s.post(url="http://hooks.example.com/cb", body=b"{}", headers={})
    assert not result.ok and result.error is not None and "link-local" in result.error


def test_bad_scheme_is_result_not_exception() -> None:
    with WebhookSender() as s:
        result = s.post(url="file:///etc/passwd", body=b"{}", headers={})
    assert not result.ok and result.status is None and result.error is not None


def test_connection_refused_is_result_not_exception() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The port is now closed, so the connect is refused.
    with WebhookSender(allow=LOCAL) as s:
        result = s.post(url=f"http://127.0.0.1:{port}/", body=b"{}", headers={})
    assert not result.ok
    assert result.status is None
    assert result.error is not None and "ConnectionError" in result.error


def test_caller_session_not_closed(server: TestServer) -> None:
    import requests

    with requests.Session() as session:
        with WebhookSender(session=session, allow=LOCAL) as s:
            assert s.post(url=url(server, "/ok"), body=b"{}", headers={}).ok
        # Still usable after the sender is closed: the caller owns it.
        with WebhookSender(session=session, allow=LOCAL) as s:
            assert s.post(url=url(server, "/ok"), body=b"{}", headers={}).ok


# --- parse_retry_after -------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        ("99999999999", 86400.0),
        (formatdate(1000 + 30, usegmt=True), 30.0),
        (formatdate(1000 - 30, usegmt=True), 0.0),
        (None, None),
        ("", None),
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:00", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=1000.0) == expected


# --- next_delay ---------------------------------------------------------------

SCHEDULE = (5.0, 30.0, 300.0)


def test_next_delay_follows_schedule_without_jitter() -> None:
    delays = [
        next_delay(attempt=a, schedule=SCHEDULE, retry_after=None, jitter=0.0) for a in (1, 2, 3)
    ]
    assert delays == [5.0, 30.0, 300.0]


def test_next_delay_exhausted_is_none() -> None:
    assert next_delay(attempt=4, schedule=SCHEDULE, retry_after=None) is None
    assert next_delay(attempt=1, schedule=(), retry_after=None) is None


@pytest.mark.parametrize(("r", "expected"), [(0.0, 27.0), (0.5, 30.0), (1.0, 33.0)])
def test_next_delay_jitter_bounds(r: float, expected: float) -> None:
    assert next_delay(
        attempt=2, schedule=SCHEDULE, retry_after=None, jitter=0.1, rand=lambda: r
    ) == pytest.approx(expected)


def test_next_delay_respects_retry_after() -> None:
    assert next_delay(attempt=1, schedule=SCHEDULE, retry_after=60.0, rand=lambda: 0.5) == 60.0
    # A shorter Retry-After never shortens the scheduled delay.
    assert next_delay(attempt=2, schedule=SCHEDULE, retry_after=1.0, rand=lambda: 0.5) == 30.0


def test_next_delay_retry_after_capped_at_schedule_max() -> None:
    assert next_delay(attempt=1, schedule=SCHEDULE, retry_after=86400.0, rand=lambda: 0.5) == 300.0


def test_next_delay_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        next_delay(attempt=0, schedule=SCHEDULE, retry_after=None)
    with pytest.raises(ValueError):
        next_delay(attempt=1, schedule=SCHEDULE, retry_after=None, jitter=1.5)
