"""A provider that POSTs each message as JSON to a carrier's HTTP endpoint.

Request: ``{"id": <idempotency key>, "to", "from", "body", "channel"}`` with
``Authorization: Bearer <token>``. Response classes:

- 2xx: accepted; the provider id is the JSON ``id`` (or ``message_id``) of the reply.
- 408, 425, 429, 5xx and a connection that could not be made: transient
  (``Retry-After`` kept).
- a read timeout, or the connection closed before the reply: ``unknown``, never
  sent again (the carrier may have taken it; see ``errors.may_have_arrived``).
- 404, 410: permanent for this channel (fall back to the next channel).
- any other 4xx: permanent for the recipient.
- A JSON reply ``{"error": {"class": "transient|channel|recipient", ...}}`` overrides.

Receipts come back on ``POST /dlr/http`` (see the README).
"""

from __future__ import annotations

from typing import Any

import requests

from dispatcher.channels import errors
from dispatcher.channels.base import OutboundMessage, Outcome, SendResult
from dispatcher.channels.breaker import Breaker, HttpVendor

TRANSIENT_STATUSES = frozenset({408, 425, 429})
CHANNEL_STATUSES = frozenset({404, 410})


def classify(status: int, body: Any) -> Outcome:
    """The failure class of a carrier's reply."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        named = body["error"].get("class")
        # An error reply is an answer: never "accepted", nor "unknown" (no answer came).
        if named in {o.value for o in Outcome} - {Outcome.ACCEPTED, Outcome.UNKNOWN}:
            return Outcome(named)
    if 200 <= status < 300:
        return Outcome.ACCEPTED
    if status in TRANSIENT_STATUSES or status >= 500:
        return Outcome.TRANSIENT
    if status in CHANNEL_STATUSES:
        return Outcome.CHANNEL
    return Outcome.RECIPIENT


class HttpProvider(HttpVendor):
    name = "http"

    def __init__(
        self,
        *,
        url: str,
        token: str = "",
        connect_timeout: float = 3.0,
        read_timeout: float = 10.0,
        session: requests.Session | None = None,
        breaker: Breaker | None = None,
    ) -> None:
        if not url:
            raise ValueError("the http provider needs DISPATCHER_HTTP_PROVIDER_URL")
        self.url = url
        self.timeout = (connect_timeout, read_timeout)
        self.breaker = breaker or Breaker()
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = "Dispatcher/1"
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def hand_over(self, message: OutboundMessage) -> SendResult:
        payload = {
            "id": message.idempotency_key,
            "to": message.to,
            "from": message.sender,
            "body": message.body,
            "channel": message.channel,
        }
        try:
            response = self.session.post(
                self.url, json=payload, timeout=self.timeout, allow_redirects=False
            )
        except requests.RequestException as exc:
            return errors.network(exc, provider=self.name)
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        outcome = classify(response.status_code, body)
        if outcome is Outcome.ACCEPTED:
            ref = body.get("id") or body.get("message_id") if isinstance(body, dict) else None
            return SendResult(outcome, provider_message_id=str(ref or message.idempotency_key))
        error = body.get("error") if isinstance(body, dict) else None
        text = (
            str(error.get("message") or error.get("text") or "")
            if isinstance(error, dict)
            else response.text[:200]
        )
        return SendResult(
            outcome,
            error_code=f"http_{response.status_code}",
            error_text=text[:500] or response.reason,
            retry_after=errors.retry_after(response.headers),
        )
