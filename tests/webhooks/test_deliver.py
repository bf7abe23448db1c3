"""Tests for webhook delivery against real servers on loopback addresses (127.0.0.0/8, ::1)."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests

from dispatcher.webhooks import deliver, sign
from dispatcher.webhooks.deliver import DeliveryResult, WebhookSender, next_delay, parse_retry_after
from tests.helpers import in_thread, wait_for

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

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), Handler)
        self.state = ServerState()


Server = TypeVar("Server", bound=ThreadingHTTPServer)


def serving(
    make: Callable[[str, int], Server], *, before_stop: Callable[[Server], None] | None = None
) -> Iterator[Callable[..., Server]]:
    """Yield ``start(host, port)``, which serves ``make(host, port)`` on a thread; every
    server started is stopped when the generator is closed."""
    running: list[tuple[Server, threading.Thread]] = []

    def start(host: str = "127.0.0.1", port: int = 0) -> Server:
        srv = make(host, port)
        thread = threading.Thread(
            target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        running.append((srv, thread))
        return srv

    try:
        yield start
    finally:
        for srv, thread in running:
            if before_stop is not None:
                before_stop(srv)
            srv.shutdown()
            srv.server_close()
            thread.join(timeout=5)


@pytest.fixture
def serve() -> Iterator[Callable[..., TestServer]]:
    """Start TestServers (``serve(host, port)``); all are stopped at teardown."""
    yield from serving(TestServer, before_stop=lambda srv: srv.state.release.set())


@pytest.fixture
def server(serve: Callable[..., TestServer]) -> TestServer:
    return serve()


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
    # The receiver's Location is not echoed: error never carries the peer's bytes.
    assert result.error == "HTTP 302: redirect not followed"
    assert paths(server) == ["/redirect"]


def test_read_timeout_honoured(server: TestServer) -> None:
    with WebhookSender(allow=LOCAL, read_timeout=0.3) as s:
        result = s.post(url=url(server, "/slow"), body=b"{}", headers={})
    assert not result.ok
    assert result.status is None
    assert result.error == "ReadTimeout"


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
    with requests.Session() as session:
        with WebhookSender(session=session, allow=LOCAL) as s:
            assert s.post(url=url(server, "/ok"), body=b"{}", headers={}).ok
        # Still usable after the sender is closed: the caller owns it.
        with WebhookSender(session=session, allow=LOCAL) as s:
            assert s.post(url=url(server, "/ok"), body=b"{}", headers={}).ok


def test_total_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="total_timeout"):
        WebhookSender(total_timeout=0)


# --- no response text in error ------------------------------------------------


def test_error_never_quotes_a_non_http_reply() -> None:
    """A non-HTTP service's first line must not come back in the error (only the class)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(5)
        port = listener.getsockname()[1]

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(5)
                conn.recv(65536)
                conn.sendall(b"INTERNAL-ONLY secret=hunter2\r\n\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        with WebhookSender(allow=LOCAL, connect_timeout=2, read_timeout=2) as s:
            result = s.post(url=f"http://127.0.0.1:{port}/", body=b"{}", headers={})
        thread.join(timeout=5)
    assert result == DeliveryResult(False, None, "ConnectionError", None, "")


# --- DNS rebinding: the connection goes to the address that was checked ----------------

REBIND_HOST = "rebind.test"


@dataclass
class Resolver:
    """Injected check-time resolver: answers ``first`` once, then ``later`` (rebinding)."""

    first: list[str]
    later: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    calls: list[str] = field(default_factory=list)

    def __call__(self, host: str) -> list[str]:
        self.calls.append(host)
        return self.first if len(self.calls) == 1 else self.later


@pytest.fixture
def system_dns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The system resolver (what an HTTP client resolving the name itself would use)
    answers 127.0.0.1 for REBIND_HOST: the hostile DNS's second answer. Returns the
    names looked up through it."""
    real = socket.getaddrinfo
    looked_up: list[str] = []

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(host)
        return real("127.0.0.1" if host == REBIND_HOST else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


@pytest.fixture
def dialled(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record every address the sender dials; non-loopback ones are refused without
    touching the network (tests stay on loopback)."""
    real = deliver.create_connection
    seen: list[tuple[str, int]] = []

    def create_connection(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        seen.append(address)
        if not (address[0].startswith("127.") or address[0] in ("::1", REBIND_HOST)):
            raise ConnectionRefusedError(111, "refused by the test: no network beyond loopback")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(deliver, "create_connection", create_connection)
    return seen


def host_header(srv: TestServer) -> list[str]:
    with srv.state.lock:
        return [r.headers["Host"] for r in srv.state.requests]


def test_rebinding_to_loopback_never_reaches_the_local_server(
    server: TestServer, system_dns: list[str], dialled: list[tuple[str, int]]
) -> None:
    port = server.server_address[1]
    target = f"http://{REBIND_HOST}:{port}/ok"
    resolver = Resolver(first=["93.184.216.34"])  # public at check time, 127.0.0.1 after
    with WebhookSender(resolve=resolver, connect_timeout=1, read_timeout=1) as s:  # no allow-list
        result = s.post(url=target, body=b"{}", headers={})

    assert (result.ok, result.status, result.error) == (False, None, "ConnectionError")
    assert dialled == [("93.184.216.34", port)]  # the checked address, and only it
    assert resolver.calls == [REBIND_HOST]
    assert REBIND_HOST not in system_dns  # the name was never resolved a second time
    assert paths(server) == []

    # Control: a client that resolves the name itself does land on the local server,
    # so the assertions above would catch a sender that re-resolved.
    with requests.Session() as plain:
        plain.trust_env = False
        assert plain.post(target, data=b"{}", timeout=5).status_code == 200
    assert paths(server) == ["/ok"]


def test_pinned_connection_keeps_hostname_in_host_header(
    serve: Callable[..., TestServer], system_dns: list[str], dialled: list[tuple[str, int]]
) -> None:
    internal = serve("127.0.0.1")  # where the rebinding answer / system DNS points
    port = internal.server_address[1]
    checked = serve("127.0.0.2", port)  # same port, on the address that passed the check
    resolver = Resolver(first=["127.0.0.2"])
    with WebhookSender(allow=("127.0.0.2",), resolve=resolver) as s:
        first = s.post(url=f"http://{REBIND_HOST}:{port}/ok", body=b"{}", headers={})
        # The next attempt re-checks: now the name says 127.0.0.1, which is refused.
        second = s.post(url=f"http://{REBIND_HOST}:{port}/ok", body=b"{}", headers={})

    assert first.ok and first.status == 200
    assert host_header(checked) == [f"{REBIND_HOST}:{port}"]
    assert not second.ok and second.error is not None and "loopback" in second.error
    assert paths(internal) == []
    assert dialled == [("127.0.0.2", port)]
    assert REBIND_HOST not in system_dns


def test_pinned_connection_tries_each_checked_address(
    serve: Callable[..., TestServer], dialled: list[tuple[str, int]]
) -> None:
    srv = serve("127.0.0.2")
    port = srv.server_address[1]
    resolver = Resolver(first=["127.0.0.3", "127.0.0.2"])  # nothing listens on 127.0.0.3
    with WebhookSender(allow=("127.0.0.2", "127.0.0.3"), resolve=resolver) as s:
        result = s.post(url=f"http://{REBIND_HOST}:{port}/ok", body=b"{}", headers={})
    assert result.ok
    assert dialled == [("127.0.0.3", port), ("127.0.0.2", port)]
    assert host_header(srv) == [f"{REBIND_HOST}:{port}"]


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_pinned_ipv6(serve: Callable[..., TestServer], dialled: list[tuple[str, int]]) -> None:
    srv = serve("::1")
    port = srv.server_address[1]
    with WebhookSender(allow=("::1",), resolve=Resolver(first=["::1"])) as s:
        by_name = s.post(url=f"http://{REBIND_HOST}:{port}/ok", body=b"{}", headers={})
        literal = s.post(url=f"http://[::1]:{port}/ok", body=b"{}", headers={})
    assert by_name.ok and literal.ok
    assert dialled == [("::1", port), ("::1", port)]
    assert host_header(srv) == [f"{REBIND_HOST}:{port}", f"[::1]:{port}"]


def test_allowlisted_hostname_is_resolved_normally(
    server: TestServer, system_dns: list[str]
) -> None:
    """An operator-trusted name may resolve anywhere: nothing to pin, no check-time lookup."""
    port = server.server_address[1]

    def no_dns(host: str) -> list[str]:
        raise AssertionError(f"unexpected check-time lookup of {host!r}")

    with WebhookSender(allow=(REBIND_HOST,), resolve=no_dns) as s:
        result = s.post(url=f"http://{REBIND_HOST}:{port}/ok", body=b"{}", headers={})
    assert result.ok
    assert REBIND_HOST in system_dns
    assert host_header(server) == [f"{REBIND_HOST}:{port}"]


def test_unpinned_connection_fails_closed() -> None:
    """A pinned-pool connection built without a pin (a wiring bug) refuses to connect."""
    conn = deliver._PinnedHTTPConnection(
        "127.0.0.1", 9, pin=None, connect_timeout=1.0, read_timeout=1.0
    )
    with pytest.raises(ConnectionError, match="not SSRF-checked"):
        conn.connect()


# --- HTTPS: pinned to the checked IP, SNI and certificate check still use the name ------


@dataclass
class TLSFiles:
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A self-signed certificate for REBIND_HOST only (made by the openssl CLI)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not available")
    folder = tmp_path_factory.mktemp("tls")
    files = TLSFiles(folder / "cert.pem", folder / "key.pem")
    args = ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    args += ["-nodes", "-days", "2", "-subj", f"/CN={REBIND_HOST}"]
    args += ["-addext", f"subjectAltName=DNS:{REBIND_HOST}"]
    args += ["-keyout", str(files.key), "-out", str(files.cert)]
    subprocess.run(
        [openssl, *args],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return files


class TLSServer(TestServer):
    """TestServer speaking TLS; records the SNI names clients send."""

    def __init__(self, host: str, files: TLSFiles) -> None:
        super().__init__(host)
        self.sni: list[str | None] = []
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(files.cert, files.key)
        self.context.sni_callback = self._record_sni

    def _record_sni(self, sock: Any, name: str | None, context: Any) -> None:
        self.sni.append(name)

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        sock.settimeout(5)
        # A client rejecting the certificate makes this raise; the server drops it.
        return self.context.wrap_socket(sock, server_side=True), address


@pytest.fixture
def tls_server(tls_files: TLSFiles) -> Iterator[TLSServer]:
    with in_thread(TLSServer("127.0.0.2", tls_files)) as srv:
        yield srv


@contextmanager
def trusting(tls_files: TLSFiles, resolve: Callable[[str], list[str]]) -> Iterator[WebhookSender]:
    """A sender that trusts the test certificate and may reach 127.0.0.2 (the TLS server)."""
    with requests.Session() as session:
        session.verify = str(tls_files.cert)
        with WebhookSender(session=session, allow=("127.0.0.2",), resolve=resolve) as s:
            yield s


def test_https_pinned_with_sni_and_certificate_for_the_hostname(
    tls_server: TLSServer, tls_files: TLSFiles, dialled: list[tuple[str, int]]
) -> None:
    port = tls_server.server_address[1]
    with trusting(tls_files, Resolver(first=["127.0.0.2"])) as s:
        result = s.post(url=f"https://{REBIND_HOST}:{port}/ok", body=b"{}", headers={})
    assert result.ok and result.status == 200
    assert dialled == [("127.0.0.2", port)]
    assert tls_server.sni == [REBIND_HOST]  # SNI is the name, not the pinned IP
    assert host_header(tls_server) == [f"{REBIND_HOST}:{port}"]


def test_https_certificate_still_checked_against_the_hostname(
    tls_server: TLSServer, tls_files: TLSFiles
) -> None:
    """Pinning must not weaken verification: a name the certificate doesn't cover fails."""
    port = tls_server.server_address[1]
    with trusting(tls_files, Resolver(first=["127.0.0.2"])) as s:
        result = s.post(url=f"https://other.test:{port}/ok", body=b"{}", headers={})
    assert (result.ok, result.status, result.error) == (False, None, "SSLError")
    assert tls_server.sni == ["other.test"]
    assert paths(tls_server) == []


# --- total time limit -----------------------------------------------------------------

DRIP_INTERVAL = 0.2
BUDGET = 1.5


class Dripper:
    """A raw TCP receiver that sends ``prefix`` at once, then ``drip`` one byte every
    DRIP_INTERVAL seconds, until the client hangs up, the drip runs out or ``stop`` is set."""

    def __init__(self, prefix: bytes, drip: bytes) -> None:
        self.prefix = prefix
        self.drip = drip
        self.stop = threading.Event()
        self.hung_up = threading.Event()  # the client closed or shut down the connection
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(5)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(65536)
                conn.sendall(self.prefix)
                for byte in self.drip:
                    if self.stop.wait(DRIP_INTERVAL):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                self.hung_up.set()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.listener.close()


@pytest.fixture
def drip() -> Iterator[Callable[[bytes, bytes], Dripper]]:
    started: list[Dripper] = []

    def start(prefix: bytes, drip: bytes) -> Dripper:
        dripper = Dripper(prefix, drip)
        started.append(dripper)
        return dripper

    try:
        yield start
    finally:
        for dripper in started:
            dripper.close()


# 8 s of drip: far past the budget, yet a regression still ends by itself.
ENDLESS_HEADER = b"X-Pad: " + b"a" * 33


@pytest.mark.parametrize(
    "prefix",
    [
        pytest.param(b"", id="status-line-dripped"),
        # The status line is whole and only the headers drip: a socket shut down
        # mid-headers reads as their end to http.client, which must not count as a 200.
        pytest.param(b"HTTP/1.1 200 OK\r\n", id="headers-dripped"),
    ],
)
def test_dripping_receiver_cut_off_at_total_timeout(
    drip: Callable[[bytes, bytes], Dripper], prefix: bytes
) -> None:
    status_line = b"HTTP/1.1 200 OK\r\n"
    dripper = drip(prefix, (b"" if prefix else status_line) + ENDLESS_HEADER)
    # Each byte arrives well inside the per-read timeout, so only the budget can stop it.
    with WebhookSender(
        allow=LOCAL, connect_timeout=1.0, read_timeout=1.0, total_timeout=BUDGET
    ) as s:
        started = time.monotonic()
        result = s.post(url=f"http://127.0.0.1:{dripper.port}/cb", body=b"{}", headers={})
        took = time.monotonic() - started
    assert result == DeliveryResult(
        False, None, "total timeout: no complete answer within 1.5 s", None, ""
    )
    assert BUDGET - 0.1 <= took < BUDGET + 1.0
    assert dripper.hung_up.wait(timeout=5)  # the client really let go of the connection


def test_dripping_body_after_status_keeps_the_status(
    drip: Callable[[bytes, bytes], Dripper],
) -> None:
    """Once the status is in, the outcome is known: a dripped body only shortens the excerpt."""
    dripper = drip(b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n", b"b" * 40)
    with WebhookSender(allow=LOCAL, read_timeout=1.0, total_timeout=BUDGET) as s:
        started = time.monotonic()
        result = s.post(url=f"http://127.0.0.1:{dripper.port}/cb", body=b"{}", headers={})
        took = time.monotonic() - started
    assert (result.ok, result.status, result.error) == (True, 200, None)
    # What arrived before the cut-off, if anything (a partial read chunk is dropped).
    assert len(result.body_excerpt) < 40 and result.body_excerpt.strip("b") == ""
    assert BUDGET - 0.1 <= took < BUDGET + 1.0


def test_quick_answer_unaffected_by_total_timeout(server: TestServer) -> None:
    with WebhookSender(allow=LOCAL, total_timeout=BUDGET) as s:
        results = [s.post(url=url(server, "/ok"), body=b"{}", headers={}) for _ in range(3)]
    assert all(r.ok for r in results)


# --- several POSTs in flight from one thread (Volley) ----------------------------


def drain(volley: deliver.Volley) -> dict[Any, DeliveryResult]:
    """Every result still to come, by key."""
    results = {}
    while volley:
        key, result = volley.next()
        results[key] = result
    return results


def test_a_volley_keeps_posts_in_flight_and_answers_each_by_key(
    server: TestServer, sender: WebhookSender
) -> None:
    with sender.volley() as volley:
        for key, path in enumerate(["/ok", "/fail", "/throttle", "/created"]):
            volley.start(key, url=url(server, path), body=b'{"n": 1}', headers={"X-N": str(key)})
        assert len(volley) == 4  # written before any answer was read
        results = drain(volley)
    assert [(results[k].ok, results[k].status) for k in range(4)] == [
        (True, 200),
        (False, 500),
        (False, 429),
        (True, 201),
    ]
    assert results[2].retry_after == 7.0
    with server.state.lock:
        got = sorted((r.path, r.headers["X-N"], r.body) for r in server.state.requests)
    assert got == sorted(
        (p, str(k), b'{"n": 1}') for k, p in enumerate(["/ok", "/fail", "/throttle", "/created"])
    )


def test_a_silent_post_in_a_volley_times_out_alone(server: TestServer) -> None:
    """A POST whose answer never starts fails as ReadTimeout after the read timeout; the
    others in flight are answered meanwhile, and a refused URL fails without a request."""
    with WebhookSender(allow=LOCAL, read_timeout=0.5) as s, s.volley() as volley:
        started = time.monotonic()
        volley.start("slow", url=url(server, "/slow"), body=b"{}", headers={})
        volley.start("ok", url=url(server, "/ok"), body=b"{}", headers={})
        volley.start("private", url="http://10.0.0.1/hook", body=b"{}", headers={})
        first = [volley.next()[0] for _ in range(2)]
        key, result = volley.next()
        took = time.monotonic() - started
    assert first == ["private", "ok"]  # no request to make, then the answer that came
    assert key == "slow" and result.error == "ReadTimeout" and result.status is None
    assert 0.4 <= took < 2.0
    assert sorted(paths(server)) == ["/ok", "/slow"]


def test_a_closed_volley_drops_what_is_in_flight(server: TestServer) -> None:
    with WebhookSender(allow=LOCAL, read_timeout=5.0) as s:
        volley = s.volley()
        volley.start(1, url=url(server, "/slow"), body=b"{}", headers={})
        with pytest.raises(ValueError, match="already in flight"):
            volley.start(1, url=url(server, "/ok"), body=b"{}", headers={})
        volley.close()
        assert not volley
        with pytest.raises(LookupError):
            volley.next()
        # The dropped connection is not reused: the next POST gets a fresh answer.
        assert s.post(url=url(server, "/ok"), body=b"{}", headers={}).ok


def test_a_volley_posts_over_tls_with_sni_and_the_certificate_checked(
    tls_server: TLSServer, tls_files: TLSFiles
) -> None:
    port = tls_server.server_address[1]
    with trusting(tls_files, lambda host: ["127.0.0.2"]) as s, s.volley() as volley:
        for key in range(3):
            volley.start(key, url=f"https://{REBIND_HOST}:{port}/ok", body=b"{}", headers={})
        results = drain(volley)
    assert all(r.ok and r.status == 200 for r in results.values())
    assert set(tls_server.sni) == {REBIND_HOST}


def test_a_dripping_receiver_in_a_volley_is_cut_off_at_the_total_timeout(
    drip: Callable[[bytes, bytes], Dripper],
) -> None:
    dripper = drip(b"HTTP/1.1 200 OK\r\n", ENDLESS_HEADER)
    with (
        WebhookSender(
            allow=LOCAL, connect_timeout=1.0, read_timeout=1.0, total_timeout=BUDGET
        ) as s,
        s.volley() as volley,
    ):
        started = time.monotonic()
        volley.start("drip", url=f"http://127.0.0.1:{dripper.port}/cb", body=b"{}", headers={})
        assert volley.next() == (
            "drip",
            DeliveryResult(False, None, "total timeout: no complete answer within 1.5 s", None, ""),
        )
        took = time.monotonic() - started
    assert BUDGET - 0.1 <= took < BUDGET + 1.0


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


# --- kept-alive connections -------------------------------------------------------------


class KeepAliveHandler(BaseHTTPRequestHandler):
    """Answers 204 over HTTP/1.1 (keeps the connection open) and counts connections."""

    protocol_version = "HTTP/1.1"
    server: KeepAliveServer

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with self.server.lock:
            self.server.posts += 1
        self.send_response(204)
        self.end_headers()


class KeepAliveServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int = 0) -> None:
        super().__init__((host, port), KeepAliveHandler)
        self.lock = threading.Lock()
        self.connections = 0
        self.posts = 0


@pytest.fixture
def keep_alive() -> Iterator[Callable[..., KeepAliveServer]]:
    yield from serving(KeepAliveServer)


def test_posts_to_one_endpoint_reuse_one_connection(
    keep_alive: Callable[..., KeepAliveServer], dialled: list[tuple[str, int]]
) -> None:
    srv = keep_alive()
    port = srv.server_address[1]
    with WebhookSender(allow=LOCAL) as s:
        results = [
            s.post(url=f"http://127.0.0.1:{port}/hook?n={i}", body=b"{}", headers={})
            for i in range(5)
        ]
    assert [r.status for r in results] == [204] * 5
    assert (srv.connections, srv.posts) == (1, 5)
    assert dialled == [("127.0.0.1", port)]


def test_a_kept_connection_is_only_reused_for_the_same_checked_address(
    keep_alive: Callable[..., KeepAliveServer], dialled: list[tuple[str, int]]
) -> None:
    """Each attempt checks the name again; a new answer means a new connection to it."""
    first = keep_alive("127.0.0.2")
    port = first.server_address[1]
    second = keep_alive("127.0.0.3", port)
    answers = iter([["127.0.0.2"], ["127.0.0.3"], ["127.0.0.2"]])
    with WebhookSender(allow=("127.0.0.2", "127.0.0.3"), resolve=lambda host: next(answers)) as s:
        results = [
            s.post(url=f"http://{REBIND_HOST}:{port}/hook", body=b"{}", headers={})
            for _ in range(3)
        ]
    assert all(r.ok for r in results)
    assert (first.posts, second.posts) == (2, 1)
    assert (first.connections, second.connections) == (1, 1)  # the third reused the first
    assert dialled == [("127.0.0.2", port), ("127.0.0.3", port)]


def test_the_total_timeout_also_bounds_a_reused_connection() -> None:
    """The second request on a kept-alive connection drips: its own budget cuts it off."""
    accepted: list[socket.socket] = []
    hung_up = threading.Event()
    stop = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(2)
        listener.settimeout(5)
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            accepted.append(conn)
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
                    conn.recv(65536)
                    for byte in b"HTTP/1.1 200 OK\r\n" + ENDLESS_HEADER:
                        if stop.wait(DRIP_INTERVAL):
                            return
                        conn.sendall(bytes([byte]))
                except OSError:
                    hung_up.set()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with WebhookSender(
            allow=LOCAL, connect_timeout=1.0, read_timeout=1.0, total_timeout=BUDGET
        ) as s:
            first = s.post(url=f"http://127.0.0.1:{port}/a", body=b"{}", headers={})
            started = time.monotonic()
            second = s.post(url=f"http://127.0.0.1:{port}/b", body=b"{}", headers={})
            took = time.monotonic() - started
        assert hung_up.wait(timeout=5)  # the client really let go of the connection
        stop.set()
        thread.join(timeout=5)
    assert first.status == 204
    assert second == DeliveryResult(
        False, None, "total timeout: no complete answer within 1.5 s", None, ""
    )
    assert BUDGET - 0.1 <= took < BUDGET + 1.0
    assert len(accepted) == 1


@pytest.mark.parametrize(
    ("tls", "port", "host"),
    [
        (True, 443, "example.com"),
        (False, 80, "example.com"),
        (True, 8443, "example.com:8443"),
        (False, 443, "example.com:443"),
    ],
)
def test_host_header_leaves_out_only_the_schemes_own_port(tls: bool, port: int, host: str) -> None:
    conn = deliver._PinnedHTTPConnection(
        "example.com",
        port,
        pin=None,
        connect_timeout=1,
        read_timeout=1,
        context=ssl.create_default_context() if tls else None,
    )
    assert conn.host_header == host
    conn.putrequest("POST", "/hook")  # what http.client itself would send (buffered)
    assert f"Host: {host}".encode() in conn._buffer  # type: ignore[attr-defined]


# --- response heads read without the email parser ----------------------------------------


def test_response_heads_are_read_as_http_client_reads_them() -> None:
    """100-continue skipped, a folded header joined, Connection: close honoured, chunked
    bodies read to their end so the connection is kept."""
    replies = [
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After:\r\n 120\r\n"
        b"Connection: close\r\nContent-Length: 4\r\n\r\nbusy",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ]
    connections: list[int] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.settimeout(5)
        port = listener.getsockname()[1]

        def serve() -> None:
            while replies:
                conn, _ = listener.accept()
                connections.append(len(replies))
                with conn:
                    conn.settimeout(5)
                    while replies:
                        buf = b""
                        while b"\r\n\r\n{}" not in buf:
                            chunk = conn.recv(65536)
                            if not chunk:
                                break
                            buf += chunk
                        if not buf:
                            break  # the client closed this connection
                        reply = replies.pop(0)
                        conn.sendall(reply)
                        if b"Connection: close" in reply:
                            break

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with WebhookSender(allow=LOCAL, connect_timeout=2, read_timeout=2) as s:
            results = [
                s.post(url=f"http://127.0.0.1:{port}/hook", body=b"{}", headers={})
                for _ in range(3)
            ]
        thread.join(timeout=5)
    assert results == [
        DeliveryResult(False, 503, "HTTP 503", 120.0, "busy"),
        DeliveryResult(True, 200, None, None, "ok"),
        DeliveryResult(True, 204, None, None, ""),
    ]
    assert connections == [3, 2]  # a new connection after the close, then kept


def test_a_volley_reuses_kept_alive_connections(
    keep_alive: Callable[..., KeepAliveServer], dialled: list[tuple[str, int]]
) -> None:
    srv = keep_alive()
    port = srv.server_address[1]
    with WebhookSender(allow=LOCAL) as s, s.volley() as volley:
        for round_ in range(3):
            for key in range(2):
                volley.start(
                    (round_, key), url=f"http://127.0.0.1:{port}/hook", body=b"{}", headers={}
                )
            assert [r.status for r in drain(volley).values()] == [204, 204]
    # Two in flight at once: two connections, each used three times.
    assert (srv.connections, srv.posts) == (2, 6)
    assert dialled == [("127.0.0.1", port)] * 2


def test_an_answer_that_came_while_a_volley_was_starting_a_post_is_read(
    keep_alive: Callable[..., KeepAliveServer],
) -> None:
    """Starting a POST can hold the thread past another's read timeout (here a DNS
    answer that takes longer than it): the answer that came meanwhile still counts."""
    srv = keep_alive()
    port = srv.server_address[1]
    read_timeout = 0.3

    def resolve(host: str) -> list[str]:
        # The first POST is answered meanwhile; this answer comes after its read timeout.
        wait_for(lambda: srv.posts == 1 and time.monotonic() > started + 2 * read_timeout)
        return ["127.0.0.1"]

    with (
        WebhookSender(allow=LOCAL, read_timeout=read_timeout, resolve=resolve) as s,
        s.volley() as volley,
    ):
        started = time.monotonic()
        volley.start("fast", url=f"http://127.0.0.1:{port}/a", body=b"{}", headers={})
        volley.start("slow-dns", url=f"http://slow.test:{port}/b", body=b"{}", headers={})
        results = drain(volley)
    assert results["fast"].status == 204
    assert results["slow-dns"].status == 204
