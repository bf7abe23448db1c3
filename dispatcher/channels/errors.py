"""Sorting a provider's failure answers into the engine's three classes, code and text kept.

Each provider has a table from its own error codes to an Outcome (transient:
retry at a durable time; channel: fall back to the next channel now;
recipient: fail). What a table does not name is decided by the HTTP status.
"""

from __future__ import annotations

import email.utils
import logging
import math
import threading
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

import requests
import urllib3

from dispatcher.channels.base import CHANNEL_FAILED, Outcome, Receipt, SendResult

# A carrier asking for more than a day is capped: the expiry decides beyond that.
MAX_RETRY_AFTER = 24 * 3600.0
# Recipient.error_code and error_text column widths.
CODE_WIDTH = 32
TEXT_WIDTH = 500
# Recipient.provider_message_id column width.
REF_WIDTH = 100
# An operator must hear of refused credentials or an unreachable API (the messages
# wait, queued, for retries), but once a minute per provider and kind, not once per
# message: a chunk of 1,000 recipients would log 1,000 lines.
WARN_EVERY = 60.0
WAITING = "messages wait and are retried on DISPATCHER_SEND_RETRY_SCHEDULE until they expire"

log = logging.getLogger(__name__)
_warned: dict[tuple[str, str], float] = {}
_warned_lock = threading.Lock()


def warn_operator(provider: str, kind: str, text: str, *, now: float | None = None) -> bool:
    """Log ``text`` at WARNING unless this provider's ``kind`` was logged within WARN_EVERY."""
    now = time.monotonic() if now is None else now
    with _warned_lock:
        last = _warned.get((provider, kind))
        if last is not None and now - last < WARN_EVERY:
            return False
        _warned[(provider, kind)] = now
    log.warning("%s: %s", provider, text, extra={"provider": provider})
    return True


def retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), capped."""
    value = (headers.get("Retry-After") or "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


def by_status(status: int) -> Outcome:
    """The class of an HTTP answer no provider table names."""
    if 200 <= status < 300:
        return Outcome.ACCEPTED
    if status in (408, 425, 429) or status >= 500:
        return Outcome.TRANSIENT
    # 401/403 are our credentials or the operator's account, not the recipient's fault.
    if status in (401, 403):
        return Outcome.TRANSIENT
    return Outcome.RECIPIENT


def classify(table: Mapping[int, Outcome], code: int | None, status: int) -> Outcome:
    """The provider's named class for ``code``, else the HTTP status decides."""
    if code is not None and code in table:
        return table[code]
    return by_status(status)


def failure(
    outcome: Outcome,
    *,
    code: str,
    text: str | None,
    retry_after: float | None = None,
) -> SendResult:
    """A SendResult for a refused hand-off, code and text cut to their columns."""
    return SendResult(
        outcome,
        error_code=code[:CODE_WIDTH],
        error_text=(text or "")[:TEXT_WIDTH] or None,
        retry_after=retry_after,
    )


def too_long(body: str, *, limit: int, code: str, service: str) -> SendResult | None:
    """A channel refusal of text over the service's limit (the next channel carries it
    whole, never split into several bubbles); None when it fits."""
    if len(body) <= limit:
        return None
    return failure(
        Outcome.CHANNEL, code=code, text=f"{service} text messages hold at most {limit} characters"
    )


def late_failure(ref: str, outcome: Outcome | None, *, code: str, text: str | None) -> Receipt:
    """A failure a status webhook reports after the send was accepted, code and text cut.

    The provider's ``outcome`` for its code decides: a channel failure (131026, 63016...)
    becomes ``channel_failed`` and the recipient falls back; anything else fails it.
    """
    return Receipt(
        ref[:REF_WIDTH],
        CHANNEL_FAILED if outcome is Outcome.CHANNEL else "failed",
        code[:CODE_WIDTH],
        (text or "")[:TEXT_WIDTH] or None,
    )


def refused_credentials(provider: str, result: SendResult, *, check: str) -> SendResult:
    """``result``, a refusal of our own credentials, after telling the operator what to check."""
    warn_operator(
        provider,
        "credentials",
        f"the API refused our credentials ({result.error_code}: {result.error_text}); "
        f"check {check}. Meanwhile {WAITING}.",
    )
    return result


# The error codes of a hand-off that got no answer from the API: what a vendor's breaker
# counts (dispatcher/channels/breaker.py).
NETWORK = "network"
ANSWER_LOST = "outcome_unknown"
NO_ANSWER = frozenset({NETWORK, ANSWER_LOST})


def may_have_arrived(exc: requests.RequestException) -> bool:
    """Whether the request may have reached the API before the failure (its answer lost).

    A refused or timed-out connection, a TLS or proxy failure, a bad URL: nothing was
    sent. A read timeout, a connection closed after the request went out, a reply cut
    short: the API may have acted on it.
    """
    nothing_sent = requests.ConnectTimeout | requests.exceptions.SSLError
    if isinstance(exc, nothing_sent | requests.exceptions.ProxyError):
        return False
    if isinstance(exc, requests.ReadTimeout | requests.exceptions.ChunkedEncodingError):
        return True
    if isinstance(exc, requests.ConnectionError):
        # requests wraps urllib3's ProtocolError ("Connection aborted.") as it is; a
        # connection that could not be made comes as a MaxRetryError with its reason.
        return isinstance(exc.args[0] if exc.args else None, urllib3.exceptions.ProtocolError)
    return False


def network(
    exc: requests.RequestException, *, provider: str, resend_safe: bool = False
) -> SendResult:
    """A transport failure, named by its kind only (URLs may carry ids): transient when
    the request cannot have reached the API or a resend is harmless (``resend_safe``);
    else, if it may have, ``unknown``: final, never sent again (invariant 1: at most
    once per recipient and channel), as an SMPP submit without its response.

    The operator is told which host did not answer (its API URL setting).
    """
    request = getattr(exc, "request", None)
    host = urlsplit(request.url).netloc if request is not None and request.url else "its API"
    kind = type(exc).__name__
    if not resend_safe and may_have_arrived(exc):
        warn_operator(
            provider,
            ANSWER_LOST,
            f"no answer from {host} ({kind}) after a message was sent: such messages"
            " end unknown, not sent again, as the API may have taken them.",
        )
        text = f"{kind} after the request was sent; not re-sent to avoid a duplicate"
        return failure(Outcome.UNKNOWN, code=ANSWER_LOST, text=text)
    warn_operator(provider, NETWORK, f"no answer from {host} ({kind}); {WAITING}.")
    return failure(Outcome.TRANSIENT, code=NETWORK, text=kind)


def reply_json(response: requests.Response) -> object:
    """The reply's JSON, or None when it is not JSON."""
    try:
        return response.json()
    except ValueError:
        return None
