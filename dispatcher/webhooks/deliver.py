"""Single-attempt webhook delivery over HTTP plus the retry back-off calculation.

``WebhookSender.post`` never raises for delivery problems: unsafe URLs, network
errors, timeouts and non-2xx answers all come back as a failed DeliveryResult
so the caller can record the attempt and schedule a retry with ``next_delay``.

Two defences beyond the SSRF check itself:

* Pinning. The URL's host is resolved and checked once (``netsafety.resolve_checked``)
  and the connection goes to exactly the checked addresses; the HTTP client never
  resolves the name again, so a DNS answer that changes between check and connect
  (rebinding) cannot reach an internal address. The URL keeps its hostname, so
  the Host header, TLS SNI and certificate verification all use that name.
* A wall-clock budget (``total_timeout``). Connect/read timeouts apply per socket
  operation, so a receiver dripping its answer a byte at a time could hold a
  worker forever; a watchdog shuts the attempt's socket down when the budget runs out.
  DNS resolution has its own, shorter bound (``resolve_timeout``).

Connections are kept alive and reused per (scheme, host, port, checked addresses):
a pooled connection only ever goes to addresses that the current attempt's own
check produced, so reuse never weakens the pinning. A URL whose check needs no DNS
answer (an IP literal, an allow-listed name) checks the same way every time, so its
result is kept per sender; a name is resolved and checked on every attempt.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import random
import re
import select
import socket
import ssl
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import requests
import requests.certs
from requests.utils import requote_uri

from dispatcher import netsafety

__all__ = ["DeliveryResult", "Volley", "WebhookSender", "next_delay", "parse_retry_after"]

# Upper bound for a receiver-supplied Retry-After, so a hostile or buggy value
# cannot park a message forever (next_delay caps it further to the schedule).
MAX_RETRY_AFTER = 86400.0
_RETRY_AFTER_STATUSES = frozenset({429, 503})
_CHUNK = 1024
# Pools kept per sender (LRU): one per (scheme, host, port, checked addresses).
_MAX_POOLS = 256
_NETWORK_ERRORS = (OSError, ValueError, http.client.HTTPException)
# http.client's limits on a response's header block.
_MAX_LINE = 65536
_MAX_HEADERS = 100
# Checked URLs whose check needed no DNS answer (an IP literal, an allow-listed name),
# kept per sender: the same URL and allow-list always check the same way.
_MAX_ROUTES = 1024
_legal_name = re.compile(rb"[^:\s][^:\r\n]*").fullmatch
_illegal_value = re.compile(rb"\n(?![ \t])|\r(?![ \t\n])").search
# Set by the sender alone, whatever headers a caller gives.
_FRAMING = frozenset({"content-type", "content-length"})
# Dialling goes through this name (tests watch what is dialled through it).
create_connection = socket.create_connection


@dataclass(frozen=True)
class DeliveryResult:
    """Outcome of one delivery attempt.

    ``error`` is a short reason built by the sender ("HTTP 500", an exception
    class name, "unsafe URL: ...") and never contains bytes from the response;
    the response body is only in ``body_excerpt``.
    """

    ok: bool
    status: int | None
    error: str | None
    retry_after: float | None
    body_excerpt: str


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Return a Retry-After header (delta-seconds or HTTP-date) as seconds from now, or None."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return min(float(text), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # RFC 9110 HTTP-dates are always GMT; a zoneless date is malformed
    current = time.time() if now is None else now
    return min(max(0.0, when.timestamp() - current), MAX_RETRY_AFTER)


def _new_session() -> requests.Session:
    """Return a session that ignores proxy env vars and ~/.netrc."""
    session = requests.Session()
    # trust_env would attach ~/.netrc credentials to customer-controlled hosts
    # and route through env proxies that bypass the SSRF check's assumptions.
    session.trust_env = False
    return session


class _Watchdog:
    """One thread that expires every budget of a sender when its time is up.

    All budgets of a sender last the same ``seconds``, so deadlines arrive in the order
    the budgets were made: the oldest live budget is always the next to expire. The
    thread is never woken for a new budget: with none live it sleeps at most ``seconds``,
    and any budget made meanwhile expires after that (a wake-up per POST costs).
    """

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        # A plain lock, not a condition: nothing ever wakes the thread.
        self._lock = threading.Lock()
        self._live: dict[int, _Budget] = {}  # in the order made: the oldest first
        self._thread: threading.Thread | None = None

    def add(self, budget: _Budget) -> None:
        """Expire ``budget`` at its deadline unless it is discarded first."""
        with self._lock:
            self._live[id(budget)] = budget
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="webhook-watchdog", daemon=True
                )
                self._thread.start()

    def discard(self, budget: _Budget) -> None:
        """Forget ``budget`` (its attempt is over)."""
        with self._lock:
            self._live.pop(id(budget), None)

    def _run(self) -> None:
        while True:
            with self._lock:
                budget = next(iter(self._live.values()), None)
            if budget is None:
                time.sleep(self._seconds)
                continue
            delay = budget.remaining()
            if delay > 0:
                time.sleep(delay)
                continue
            with self._lock:
                # Held here, so its id is no other budget's: gone means discarded.
                if self._live.pop(id(budget), None) is None:
                    continue
            budget.expire()


class _Budget:
    """The wall-clock limit of one POST.

    The watchdog shuts down every connection the attempt used once the limit passes,
    so a read blocked on a dripping receiver returns at once; connects are
    clamped to the time left. Socket timeouts alone cannot do this: they bound
    each read, not their sum.
    """

    def __init__(self, seconds: float, watchdog: _Watchdog) -> None:
        self.seconds = seconds
        self._deadline = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []  # owned by their connections
        self._expired = False
        self._closed = False
        self._watchdog = watchdog
        watchdog.add(self)

    @property
    def expired(self) -> bool:
        """Whether the watchdog fired."""
        return self._expired  # set once, under the lock, before any socket is shut

    def remaining(self) -> float:
        """Seconds left (<= 0 once the budget is spent)."""
        return self._deadline - time.monotonic()

    def watch(self, watcher: socket.socket) -> None:
        """Shut ``watcher`` (a connection's duplicate descriptor) down when the budget runs
        out, at once if it already has. The connection owns and closes it."""
        with self._lock:
            if self._closed:
                return
            self._sockets.append(watcher)
            if self._expired:
                with contextlib.suppress(OSError):
                    watcher.shutdown(socket.SHUT_RDWR)

    def forget(self, watcher: socket.socket) -> None:
        """Stop watching ``watcher`` (its connection is closed or handed on)."""
        with self._lock:
            if watcher in self._sockets:
                self._sockets.remove(watcher)

    def expire(self) -> None:
        """Shut down every watched socket (called by the watchdog)."""
        with self._lock:
            if self._closed:
                return
            self._expired = True
            for dup in self._sockets:
                with contextlib.suppress(OSError):
                    dup.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Leave the watchdog and stop watching (the connections close their descriptors)."""
        self._watchdog.discard(self)
        with self._lock:
            self._closed = True
            self._sockets = []


# The budget of the attempt running on this thread: pooled connections outlive
# attempts, so each request looks up the budget it must report its socket to.
_attempt = threading.local()


def _current_budget() -> _Budget | None:
    return getattr(_attempt, "budget", None)


@dataclass(frozen=True)
class _Route:
    """A checked URL: where to connect, the name to speak to and the request target."""

    checked: netsafety.CheckedURL
    host: str
    target: str


@dataclass(frozen=True)
class _Pin:
    """Where a pool's connections may go: a checked URL's addresses."""

    checked: netsafety.CheckedURL


class _ConnectFailed(ConnectionError):
    """No checked address took the connection (reported as ``ConnectionError``)."""


class _ConnectTimedOut(TimeoutError):
    """Connecting took longer than allowed (reported as ``ConnectTimeout``)."""


def _connect_pinned(conn: _PinnedHTTPConnection) -> socket.socket:
    """Open the TCP connection for ``conn`` to a checked address, never re-resolving."""
    pin = conn.pin
    if pin is None:  # fail closed: only the sender's pools create these connections
        raise _ConnectFailed("refusing a connection that was not SSRF-checked")
    checked = pin.checked
    if checked.addresses:
        targets: tuple[str, ...] = checked.addresses
    elif conn.host.lower() == checked.host.lower().rstrip("."):
        # An allow-listed hostname: the operator trusts whatever it resolves to.
        targets = (conn.host,)
    else:
        raise _ConnectFailed("connection host differs from the checked URL")
    budget = _current_budget()
    if budget is None:  # fail closed: every attempt runs inside WebhookSender.post
        raise _ConnectFailed("refusing a connection outside a delivery attempt")
    last: Exception | None = None
    for target in targets:
        remaining = budget.remaining()
        if remaining <= 0:
            raise _ConnectTimedOut(
                f"total time limit ({budget.seconds:g} s) spent before connecting"
            )
        limit = min(conn.connect_timeout, remaining)
        try:
            sock = create_connection((target, conn.port), limit)
        except TimeoutError as exc:  # socket.timeout
            last = _ConnectTimedOut(f"connection to {target} timed out ({limit:g} s)")
            last.__cause__ = exc
            continue
        except OSError as exc:
            last = _ConnectFailed(f"failed to connect to {target}: {exc}")
            last.__cause__ = exc
            continue
        sys.audit("http.client.connect", conn, target, conn.port)
        try:
            # A duplicate descriptor of the same connection, made once: TLS wrapping
            # detaches ``sock`` itself, and shutdown() acts on the connection.
            watcher = socket.fromfd(sock.fileno(), sock.family, sock.type, sock.proto)
        except OSError:  # no descriptor left to duplicate: no unwatched connection either
            sock.close()
            raise
        conn.watcher = watcher
        budget.watch(watcher)
        # Small requests: no waiting for the peer's delayed ACK (Nagle).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(conn.timeout)
        return sock
    assert last is not None
    raise last


def _header_line(name: str, value: str) -> str:
    """``name: value``, with the checks http.client's putheader makes (nothing smuggled in)."""
    if not _legal_name(name.encode("ascii")) or _illegal_value(value.encode("latin-1")):
        raise ValueError(f"invalid header {name!r}")
    return f"{name}: {value}"


def _host_header(host: str, port: int, *, default_port: int) -> str:
    """The Host header http.client would send: the scheme's own port left out
    ("example.com", not "example.com:443"), as receivers routing by exact Host expect."""
    try:
        name = host.encode("ascii")
    except UnicodeEncodeError:
        name = host.encode("idna")
    if b":" in name:  # IPv6, in brackets and without a zone
        name = b"[" + name.split(b"%", 1)[0] + b"]"
    text = name.decode("ascii")
    return text if port == default_port else f"{text}:{port}"


class _Headers:
    """A response's header fields by lower-cased name: what HTTPResponse reads of them."""

    def __init__(self, fields: dict[str, list[str]]) -> None:
        self._fields = fields

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self._fields.get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str, failobj: Any = None) -> Any:
        return self._fields.get(name.lower()) or failobj


class _Response(http.client.HTTPResponse):
    """An HTTP response whose header block is split into fields directly.

    http.client parses every header block with the email package (a feed parser and a
    Message per response): most of a POST's CPU on a fast receiver. The status line,
    the 100-continue skip and the body framing (chunked, Content-Length, close) are
    http.client's own, as are the line and count limits.
    """

    def __init__(self, reader: Any) -> None:
        # The connection's own buffered reader, kept for its life: no file object per
        # response. It stays open when the response closes (see _close_conn).
        self.fp = reader
        self.debuglevel = 0
        self._method = "POST"
        self.headers = self.msg = None  # type: ignore[assignment]
        self.version = self.status = self.reason = http.client._UNKNOWN  # type: ignore[attr-defined]
        self.chunked = self.chunk_left = http.client._UNKNOWN  # type: ignore[attr-defined]
        self.length = self.will_close = http.client._UNKNOWN  # type: ignore[attr-defined]

    def _close_conn(self) -> None:
        # The answer is over: the reader belongs to the connection, which closes it.
        self.fp = None  # type: ignore[assignment]

    def begin(self) -> None:
        if self.headers is not None:
            return
        while True:
            version, status, reason = self._read_status()
            if status != http.client.CONTINUE:
                break
            _read_fields(self.fp)
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = _read_fields(self.fp)
        encoding = self.headers.get("transfer-encoding")
        self.chunked = bool(encoding and encoding.lower() == "chunked")
        self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None
        length = self.headers.get("content-length")
        if length and not self.chunked:
            with contextlib.suppress(ValueError):
                self.length = int(length) if int(length) >= 0 else None
        if status in (http.client.NO_CONTENT, http.client.NOT_MODIFIED) or 100 <= status < 200:
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True


def _read_fields(fp: Any) -> _Headers:
    """Read a header block up to its empty line (http.client's limits) into fields."""
    fields: dict[str, list[str]] = {}
    last: list[str] | None = None
    for _ in range(_MAX_HEADERS + 1):
        line = fp.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise http.client.LineTooLong("header line")
        if line in (b"\r\n", b"\n", b""):
            return _Headers(fields)
        text = line.decode("iso-8859-1")
        if text[:1] in (" ", "\t") and last:  # obsolete line folding: continues the value
            last[-1] = f"{last[-1]} {text.strip()}"
            continue
        name, colon, value = text.partition(":")
        if not colon:
            continue  # not a field (the email parser drops these too)
        last = fields.setdefault(name.strip().lower(), [])
        last.append(value.strip())
    raise http.client.HTTPException(f"got more than {_MAX_HEADERS} headers")


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection whose DNS step is replaced by the checked addresses.

    ``timeout`` bounds each read and write; ``connect_timeout`` the connect."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        pin: _Pin | None,
        connect_timeout: float,
        read_timeout: float,
        context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(host, port, timeout=read_timeout)
        self.default_port = http.client.HTTPS_PORT if context is not None else http.client.HTTP_PORT
        self.pin = pin
        self.connect_timeout = connect_timeout
        self.context = context
        self.host_header = _host_header(self.host, self.port, default_port=self.default_port)
        # Shut down by an attempt's budget when it runs out (see _Budget).
        self.watcher: socket.socket | None = None
        # Every answer on this connection is read through this one buffered reader.
        self.reader: Any = None

    def close(self) -> None:
        """Close the connection, its reader and its watched duplicate descriptor."""
        reader, self.reader = self.reader, None
        if reader is not None:
            reader.close()  # the socket's descriptor closes only once its reader has
        super().close()
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            budget = _current_budget()
            if budget is not None:
                budget.forget(watcher)  # under the budget's lock: never shut down once closed
            watcher.close()

    def connect(self) -> None:
        """Connect to a checked address (and speak TLS to the URL's hostname)."""
        sock = _connect_pinned(self)
        if self.context is not None:
            try:
                # SNI and the certificate check use the URL's name, not the pinned IP.
                sock = self.context.wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
        self.sock = sock
        self.reader = sock.makefile("rb")

    def dropped(self) -> bool:
        """Whether a kept-alive connection was closed (or written to) by the peer meanwhile."""
        if self.sock is None:
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)


class _Pool:
    """Idle kept-alive connections to one checked address set."""

    def __init__(self, pin: _Pin, maxsize: int) -> None:
        self.pin = pin
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._idle: list[_PinnedHTTPConnection] = []

    def take(self) -> _PinnedHTTPConnection | None:
        """An idle connection still open, or None."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                conn = self._idle.pop()
            if not conn.dropped():
                return conn
            conn.close()

    def give(self, conn: _PinnedHTTPConnection) -> None:
        """Keep ``conn`` for the next attempt (or close it if the pool is full)."""
        with self._lock:
            if len(self._idle) < self.maxsize:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _tls_context(session: requests.Session) -> ssl.SSLContext:
    """A client TLS context from the session's ``verify`` and ``cert`` (as requests reads them)."""
    verify = session.verify
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        where = requests.certs.where() if verify is True else str(verify)
        if os.path.isdir(where):
            context = ssl.create_default_context(capath=where)
        else:
            context = ssl.create_default_context(cafile=where)
    cert = session.cert
    if isinstance(cert, str):
        context.load_cert_chain(cert)
    elif cert:
        context.load_cert_chain(cert[0], cert[1])
    return context


def _error_name(exc: BaseException, *, connecting: bool) -> str:
    """The short reason of a failed attempt, in the names requests used for them."""
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return "SSLError"
    if isinstance(exc, _ConnectTimedOut) or (connecting and isinstance(exc, TimeoutError)):
        return "ConnectTimeout"
    if isinstance(exc, TimeoutError):
        return "ReadTimeout"
    if isinstance(exc, OSError | http.client.HTTPException):
        return "ConnectionError"
    return type(exc).__name__


def _out_of_time(budget: _Budget) -> DeliveryResult:
    """The failed result of an attempt the watchdog cut off before its status was known."""
    error = f"total timeout: no complete answer within {budget.seconds:g} s"
    return DeliveryResult(False, None, error, None, "")


@dataclass(slots=True)
class _Flight:
    """A POST whose request is written and whose answer is not read yet."""

    budget: _Budget
    conn: _PinnedHTTPConnection
    pool: _Pool
    read_by: float  # monotonic: no answer begun by then is a read timeout


class Volley:
    """POSTs with several in flight at once, driven by one thread.

    Each POST is an ordinary attempt (its own SSRF check, pinned kept-alive connection,
    TLS, total budget and response cap): connecting and writing the request are done
    at once, then the thread waits on every written POST's socket together and reads
    each answer as it arrives. ``start`` a POST, take answers with ``next`` in the
    order they come; a POST whose answer has not begun within the read timeout fails
    as "ReadTimeout", as it does alone. Close (or leave the ``with``) to drop what is
    still in flight: those connections are closed, never reused.
    """

    def __init__(self, sender: WebhookSender, seconds: float, watchdog: _Watchdog) -> None:
        self._sender = sender
        self._seconds = seconds
        self._watchdog = watchdog
        # poll(): registering is no system call, and a wait is one (few sockets each).
        self._poll = select.poll()
        self._flights: dict[Any, _Flight] = {}
        self._keys: dict[int, Any] = {}  # descriptor -> key
        self._events: list[int] = []  # descriptors found readable, not yet read
        self._ready: deque[tuple[Any, DeliveryResult]] = deque()

    def __len__(self) -> int:
        """POSTs started whose answers ``next`` has not given yet."""
        return len(self._flights) + len(self._ready)

    def __enter__(self) -> Volley:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self, key: Any, *, url: str, body: bytes, headers: Mapping[str, str]) -> None:
        """Send a POST; ``next`` gives its result with ``key`` (unique among those in flight)."""
        if key in self._flights:
            raise ValueError(f"{key!r} is already in flight")
        budget = _Budget(self._seconds, self._watchdog)
        _attempt.budget = budget
        try:
            flight = self._sender._send(url=url, body=body, headers=headers, budget=budget)
        finally:
            _attempt.budget = None
        if isinstance(flight, DeliveryResult):
            budget.close()
            self._ready.append((key, flight))
            return
        self._flights[key] = flight
        fd = flight.conn.sock.fileno()
        self._keys[fd] = key
        self._poll.register(fd, select.POLLIN)

    def fail(self, key: Any, result: DeliveryResult) -> None:
        """Give ``result`` for ``key`` through ``next`` without a POST (nothing to send)."""
        self._ready.append((key, result))

    def next(self) -> tuple[Any, DeliveryResult]:
        """The next POST to finish, with its key (one must be in flight)."""
        if self._ready:
            return self._ready.popleft()
        while self._events:  # sockets found readable by the last wait
            key = self._keys.get(self._events.pop())
            if key is not None:
                return self._finish(key, answered=True)
        if not self._flights:
            raise LookupError("no POST in flight")
        while True:
            # Few in flight: the first to time out is found by looking at each.
            key, flight = min(self._flights.items(), key=lambda kv: kv[1].read_by)
            wait = flight.read_by - time.monotonic()
            # Looked at even when the first is past its time: starting a POST (a connect,
            # a TLS handshake) can have held the thread while answers came in.
            # Rounded up: a poll that returns early would only come round again.
            events = self._poll.poll(max(0, math.ceil(wait * 1000)))
            if events:
                self._events = [fd for fd, _ in events]
                return self._finish(self._keys[self._events.pop()], answered=True)
            if wait <= 0:
                return self._finish(key, answered=False)

    def _finish(self, key: Any, *, answered: bool) -> tuple[Any, DeliveryResult]:
        """Read ``key``'s answer (``answered``: its socket is readable) or time it out."""
        flight = self._flights.pop(key)
        self._forget(flight)
        _attempt.budget = flight.budget
        try:
            sender = self._sender
            result = sender._answer(flight) if answered else sender._timed_out(flight)
        finally:
            _attempt.budget = None
            flight.budget.close()
        return key, result

    def close(self) -> None:
        """Drop the POSTs still in flight (their connections are closed)."""
        flights, self._flights = list(self._flights.values()), {}
        self._ready.clear()
        for flight in flights:
            self._forget(flight)
            _attempt.budget = flight.budget
            try:
                flight.conn.close()
            finally:
                _attempt.budget = None
                flight.budget.close()

    def _forget(self, flight: _Flight) -> None:
        """Stop waiting on ``flight``'s socket (still open)."""
        fd = flight.conn.sock.fileno()
        del self._keys[fd]
        self._poll.unregister(fd)


class WebhookSender:
    """POSTs signed webhook bodies to callback URLs, one attempt per call."""

    def __init__(
        self,
        *,
        session: requests.Session | None = None,
        connect_timeout: float = 3.0,
        read_timeout: float = 10.0,
        total_timeout: float = 30.0,
        max_response_bytes: int = 4096,
        allow: Collection[str] = (),
        resolve: Callable[[str], list[str]] = netsafety.default_resolve,
        resolve_timeout: float = 2.0,
        user_agent: str = "Dispatcher-Webhooks/1",
        pool_size: int = 8,
        lanes: int = 64,
    ) -> None:
        """Configure timeouts, response cap, SSRF allow-list and HTTP session.

        ``total_timeout`` bounds one whole POST (resolve, connect, send, status,
        headers and the capped body read) in wall-clock seconds. ``session``
        supplies request defaults and TLS settings (``verify``, ``cert``); the
        connection itself is always made by the sender, pinned to the checked
        addresses and never through a proxy. ``resolve_timeout`` bounds one DNS
        lookup; ``pool_size`` is how many idle connections are kept per address
        set, and ``lanes`` how many deliveries :meth:`submit` runs at once.
        """
        if max_response_bytes < 0:
            raise ValueError("max_response_bytes must be >= 0")
        if not total_timeout > 0:
            raise ValueError("total_timeout must be > 0")
        self._owns_session = session is None
        self._session = session if session is not None else _new_session()
        self._timeout = (connect_timeout, read_timeout)
        self._total_timeout = float(total_timeout)
        self._max_response_bytes = max_response_bytes
        self._allow = tuple(allow)
        self._resolve = netsafety.bounded(resolve, resolve_timeout)
        self._user_agent = user_agent
        self._pool_size = pool_size
        self._lanes = lanes
        self._lock = threading.Lock()
        self._pools: OrderedDict[tuple[Any, ...], _Pool] = OrderedDict()
        self._tls: ssl.SSLContext | None = None
        self._watchdog = _Watchdog(self._total_timeout)
        self._routes: OrderedDict[str, _Route] = OrderedDict()
        self._starts: OrderedDict[tuple[str, str, tuple[str, ...]], tuple[str, tuple[str, ...]]] = (
            OrderedDict()
        )
        self._fixed: list[tuple[str, str]] | None = None
        self._executor: ThreadPoolExecutor | None = None

    def close(self) -> None:
        """Close the kept-alive connections, and the HTTP session if this sender created it."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), OrderedDict()
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        for pool in pools:
            pool.close()
        if self._owns_session:
            self._session.close()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn`` on one of the sender's delivery threads (created on first use)."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self._lanes, thread_name_prefix="webhook-lane"
                )
            executor = self._executor
        return executor.submit(fn, *args, **kwargs)

    def _pool(self, checked: netsafety.CheckedURL) -> _Pool:
        """The kept-alive connections for ``checked``'s exact address set."""
        key = (checked.scheme, checked.host, checked.port, checked.addresses)
        evicted: _Pool | None = None
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                pool = _Pool(_Pin(checked), self._pool_size)
                self._pools[key] = pool
                if len(self._pools) > _MAX_POOLS:
                    _, evicted = self._pools.popitem(last=False)
            else:
                self._pools.move_to_end(key)
        if evicted is not None:
            evicted.close()
        return pool

    def _context(self) -> ssl.SSLContext:
        """The TLS context (built once, from the session's ``verify`` and ``cert``)."""
        with self._lock:
            if self._tls is None:
                self._tls = _tls_context(self._session)
            return self._tls

    def __enter__(self) -> WebhookSender:
        """Return self for use as a context manager."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the sender's own session."""
        self.close()

    def post(self, *, url: str, body: bytes, headers: Mapping[str, str]) -> DeliveryResult:
        """POST ``body`` to ``url`` once and report the outcome without raising."""
        # Started before the DNS lookup, so a slow resolver spends the budget too.
        budget = _Budget(self._total_timeout, self._watchdog)
        _attempt.budget = budget
        try:
            return self._post(url=url, body=body, headers=headers, budget=budget)
        finally:
            _attempt.budget = None
            budget.close()

    def _route(self, url: str) -> _Route:
        """Check ``url`` (netsafety.UnsafeURL if refused): where this attempt may connect."""
        route = self._routes.get(url)
        if route is not None:
            return route
        resolved = False

        def resolve(host: str) -> list[str]:
            nonlocal resolved
            resolved = True
            return self._resolve(host)

        checked = netsafety.resolve_checked(url, allow=self._allow, resolve=resolve)
        parts = urlsplit(requote_uri(url))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        route = _Route(checked, parts.hostname or checked.host, target)
        if not resolved:
            # No DNS answer went into the check: it comes out the same every time.
            with self._lock:
                self._routes[url] = route
                if len(self._routes) > _MAX_ROUTES:
                    self._routes.popitem(last=False)
        return route

    def _fixed_headers(self) -> list[tuple[str, str]]:
        """The session's default headers with ours, as (lower-cased name, line), checked
        once (taken at first use, like the TLS settings)."""
        with self._lock:
            if self._fixed is None:
                fixed = dict(self._session.headers)
                fixed.update({"User-Agent": self._user_agent, "Accept-Encoding": "identity"})
                self._fixed = [
                    (name.lower(), _header_line(name, value))
                    for name, value in fixed.items()
                    if name.lower() not in _FRAMING
                ]
            return self._fixed

    def _head(
        self, *, conn: _PinnedHTTPConnection, target: str, body: bytes, headers: Mapping[str, str]
    ) -> bytes:
        """The request line and header block of one POST."""
        key = (conn.host_header, target, tuple(headers))
        start = self._starts.get(key)
        if start is None:
            start = self._start(conn=conn, target=target, names=key[2])
        text, names = start
        lines = [text]
        for name in names:
            value = headers[name]
            if "\r" in value or "\n" in value:  # what putheader refuses (folding it takes)
                _header_line(name, value)
            lines.append(f"{name}: {value}\r\n")
        lines.append(f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        return "".join(lines).encode("latin-1")

    def _start(
        self, *, conn: _PinnedHTTPConnection, target: str, names: tuple[str, ...]
    ) -> tuple[str, tuple[str, ...]]:
        """The fixed part of a POST's head for these given header names (checked once),
        and the names whose values each POST adds."""
        given = {name.lower() for name in names}
        lines = [f"POST {target} HTTP/1.1", f"Host: {conn.host_header}"]
        lines += [line for name, line in self._fixed_headers() if name not in given]
        kept = tuple(name for name in names if name.lower() not in _FRAMING)
        for name in kept:
            _header_line(name, "")  # the name; values are checked per POST
        start = ("".join(f"{line}\r\n" for line in lines), kept)
        with self._lock:
            self._starts[(conn.host_header, target, names)] = start
            if len(self._starts) > _MAX_ROUTES:
                self._starts.popitem(last=False)
        return start

    def _post(
        self, *, url: str, body: bytes, headers: Mapping[str, str], budget: _Budget
    ) -> DeliveryResult:
        flight = self._send(url=url, body=body, headers=headers, budget=budget)
        if isinstance(flight, DeliveryResult):
            return flight
        return self._answer(flight)

    def _send(
        self, *, url: str, body: bytes, headers: Mapping[str, str], budget: _Budget
    ) -> _Flight | DeliveryResult:
        """Write one POST on a checked connection; its answer is read by _answer (or the
        failed result if it could not be sent)."""
        try:
            # Checked on every attempt, and the connection goes to these very addresses.
            route = self._route(url)
        except netsafety.UnsafeURL as exc:
            return DeliveryResult(False, None, f"unsafe URL: {exc}", None, "")
        checked = route.checked

        pool = self._pool(checked)
        conn = pool.take()
        connecting = conn is None
        try:
            if conn is None:
                conn = _PinnedHTTPConnection(
                    route.host,
                    checked.port,
                    pin=pool.pin,
                    connect_timeout=self._timeout[0],
                    read_timeout=self._timeout[1],
                    context=self._context() if checked.scheme == "https" else None,
                )
                conn.connect()
                connecting = False
            elif conn.watcher is not None:
                budget.watch(conn.watcher)  # a kept connection answers to this attempt's budget
            head = self._head(conn=conn, target=route.target, body=body, headers=headers)
            assert conn.sock is not None
            # One write: request line, headers and body (one packet for a small callback).
            # No redirect is ever followed: a 3xx is reported as a failure by _answer.
            conn.sock.sendall(head + body)
        except _NETWORK_ERRORS as exc:
            return self._failed(exc, conn=conn, response=None, budget=budget, connecting=connecting)
        return _Flight(budget, conn, pool, time.monotonic() + self._timeout[1])

    def _failed(
        self,
        exc: BaseException,
        *,
        conn: _PinnedHTTPConnection | None,
        response: _Response | None,
        budget: _Budget,
        connecting: bool,
    ) -> DeliveryResult:
        """The result of an attempt that raised: its connection is closed, never reused."""
        if response is not None:
            response.close()
        if conn is not None:
            conn.close()
        if budget.expired:
            return _out_of_time(budget)
        # A short name only: messages can quote the peer's bytes (a bad status line).
        return DeliveryResult(False, None, _error_name(exc, connecting=connecting), None, "")

    def _answer(self, flight: _Flight) -> DeliveryResult:
        """Read the answer to a written POST; its connection goes back to the pool if whole."""
        budget, conn, pool = flight.budget, flight.conn, flight.pool
        response = _Response(conn.reader)
        try:
            response.begin()
            if budget.expired:
                # http.client takes EOF inside the header block for its end, so
                # headers cut short by the watchdog can look like a whole answer.
                response.close()
                conn.close()
                return _out_of_time(budget)
            status = int(response.status)
            excerpt = self._read_excerpt(response)
            retry_after = (
                parse_retry_after(response.getheader("Retry-After"))
                if status in _RETRY_AFTER_STATUSES
                else None
            )
        except _NETWORK_ERRORS as exc:
            return self._failed(exc, conn=conn, response=response, budget=budget, connecting=False)
        if response.isclosed() and not response.will_close and not budget.expired:
            if conn.watcher is not None:
                budget.forget(conn.watcher)  # another attempt's budget watches it next
            pool.give(conn)  # the whole answer was read: the connection can go again
        else:
            response.close()
            conn.close()

        if 200 <= status < 300:
            return DeliveryResult(True, status, None, None, excerpt)
        # No Location or body here: error must not carry the peer's bytes.
        redirect = ": redirect not followed" if 300 <= status < 400 else ""
        return DeliveryResult(False, status, f"HTTP {status}{redirect}", retry_after, excerpt)

    def _timed_out(self, flight: _Flight) -> DeliveryResult:
        """The result of a written POST whose answer did not start within the read timeout."""
        return self._failed(
            TimeoutError(), conn=flight.conn, response=None, budget=flight.budget, connecting=False
        )

    def volley(self) -> Volley:
        """A way to keep several POSTs in flight from one thread (see :class:`Volley`)."""
        return Volley(self, self._total_timeout, self._watchdog)

    def _read_excerpt(self, response: http.client.HTTPResponse) -> str:
        """Read at most max_response_bytes of the body and decode it leniently."""
        if response.length == 0:
            response.close()  # no body (a 204, or Content-Length: 0): the connection is free
            return ""
        limit = self._max_response_bytes
        buf = bytearray()
        try:
            while len(buf) < limit and not response.isclosed():
                chunk = response.read(min(_CHUNK, limit - len(buf)))
                if not chunk:
                    break
                buf += chunk
        except _NETWORK_ERRORS:
            # The status line already arrived, so the attempt's outcome is known;
            # a broken or slow body (cut off by the total budget at the latest)
            # only costs us the diagnostic excerpt.
            pass
        if response.length == 0:
            response.close()  # the whole body is read (a 204 has none): the connection is free
        return bytes(buf[:limit]).decode("utf-8", errors="replace")


def next_delay(
    *,
    attempt: int,
    schedule: Sequence[float],
    retry_after: float | None,
    jitter: float = 0.1,
    rand: Callable[[], float] = random.random,
) -> float | None:
    """Return seconds to wait after failed ``attempt`` (1-based), or None once retries run out."""
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError("jitter must be a fraction between 0 and 1")
    if attempt > len(schedule):
        return None
    base = float(schedule[attempt - 1])
    delay = max(0.0, base * (1.0 + jitter * (2.0 * rand() - 1.0)))
    if retry_after is not None:
        delay = max(delay, min(retry_after, float(max(schedule))))
    return delay
