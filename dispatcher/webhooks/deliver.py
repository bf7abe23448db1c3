"""Single-attempt webhook delivery over HTTP plus the retry back-off calculation.

``WebhookSender.post`` never raises for delivery problems: unsafe URLs, network
errors, timeouts and non-2xx answers all come back as a failed DeliveryResult
so the caller can record the attempt and schedule a retry with ``next_delay``.
"""

from __future__ import annotations

import http.client
import random
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import requests

from dispatcher import netsafety

__all__ = ["DeliveryResult", "WebhookSender", "next_delay", "parse_retry_after"]

# Upper bound for a receiver-supplied Retry-After, so a hostile or buggy value
# cannot park a message forever (next_delay caps it further to the schedule).
MAX_RETRY_AFTER = 86400.0
_RETRY_AFTER_STATUSES = frozenset({429, 503})
_CHUNK = 1024


@dataclass(frozen=True)
class DeliveryResult:
    """Outcome of one delivery attempt."""

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


class WebhookSender:
    """POSTs signed webhook bodies to callback URLs, one attempt per call."""

    def __init__(
        self,
        *,
        session: requests.Session | None = None,
        connect_timeout: float = 3.0,
        read_timeout: float = 10.0,
        max_response_bytes: int = 4096,
        allow: Collection[str] = (),
        resolve: Callable[[str], list[str]] = netsafety.default_resolve,
        user_agent: str = "Dispatcher-Webhooks/1",
    ) -> None:
        """Configure timeouts, response cap, SSRF allow-list and HTTP session."""
        if max_response_bytes < 0:
            raise ValueError("max_response_bytes must be >= 0")
        self._owns_session = session is None
        self._session = session if session is not None else _new_session()
        self._timeout = (connect_timeout, read_timeout)
        self._max_response_bytes = max_response_bytes
        self._allow = tuple(allow)
        self._resolve = resolve
        self._user_agent = user_agent

    def close(self) -> None:
        """Close the HTTP session if this sender created it."""
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> WebhookSender:
        """Return self for use as a context manager."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the sender's own session."""
        self.close()

    def post(self, *, url: str, body: bytes, headers: Mapping[str, str]) -> DeliveryResult:
        """POST ``body`` to ``url`` once and report the outcome without raising."""
        try:
            # Re-checked on every attempt: the name may resolve elsewhere by now.
            netsafety.check_url(url, allow=self._allow, resolve=self._resolve)
        except netsafety.UnsafeURL as exc:
            return DeliveryResult(False, None, f"unsafe URL: {exc}", None, "")

        send_headers = {"User-Agent": self._user_agent, "Accept-Encoding": "identity"}
        send_headers.update(headers)
        for name in [k for k in send_headers if k.lower() == "content-type"]:
            del send_headers[name]
        send_headers["Content-Type"] = "application/json"

        try:
            with self._session.post(
                url,
                data=body,
                headers=send_headers,
                timeout=self._timeout,
                allow_redirects=False,
                stream=True,
            ) as response:
                status = int(response.status_code)
                excerpt = self._read_excerpt(response)
                retry_after = (
                    parse_retry_after(response.headers.get("Retry-After"))
                    if status in _RETRY_AFTER_STATUSES
                    else None
                )
                location = response.headers.get("Location")
        except (requests.RequestException, OSError, ValueError, http.client.HTTPException) as exc:
            return DeliveryResult(False, None, f"{type(exc).__name__}: {exc}", None, "")

        if 200 <= status < 300:
            return DeliveryResult(True, status, None, None, excerpt)
        if 300 <= status < 400:
            error = f"HTTP {status}: redirect not followed (Location: {location or '-'})"
        else:
            error = f"HTTP {status}"
        return DeliveryResult(False, status, error, retry_after, excerpt)

    def _read_excerpt(self, response: requests.Response) -> str:
        """Read at most max_response_bytes of the body and decode it leniently."""
        limit = self._max_response_bytes
        if limit == 0:
            return ""
        buf = bytearray()
        try:
            for chunk in response.iter_content(chunk_size=min(_CHUNK, limit)):
                buf += chunk
                if len(buf) >= limit:
                    break
        except (requests.RequestException, OSError, http.client.HTTPException):
            # The status line already arrived, so the attempt's outcome is known;
            # a broken or slow body only costs us the diagnostic excerpt.
            pass
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
