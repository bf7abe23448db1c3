"""RCS through Google's RCS Business Messaging (RBM) API.

Follows Google's public RBM documentation: "Send messages"
(``POST /v1/phones/{msisdn}/agentMessages?messageId=&agentId=``), "Authenticate
API calls" (a service account's OAuth 2.0 token, JWT bearer grant to the key
file's ``token_uri``), "Check RCS capability" (a 404 NOT_FOUND for a user whose
device cannot take RCS) and the ``google.rpc`` error body
``{"error": {"code", "message", "status"}}``.

The ``messageId`` is the recipient's id, so a hand-off repeated after a lost
worker is refused by RBM as ALREADY_EXISTS (409), which is the same acceptance.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import requests

from dispatcher.channels import errors
from dispatcher.channels.base import OutboundMessage, Outcome, Receipt, SendResult
from dispatcher.channels.breaker import Breaker, HttpVendor

SCOPE = "https://www.googleapis.com/auth/rcsbusinessmessaging"
DEFAULT_API_URL = "https://rcsbusinessmessaging.googleapis.com"
# RBM's documented maximum for a text message: longer text is refused for RCS
# (the next channel, usually SMS, carries it) rather than split into several bubbles.
MAX_TEXT = 3072
# What the operator checks when Google refuses the service account.
KEY_FILE = (
    "DISPATCHER_RBM_SERVICE_ACCOUNT_FILE (the key, and the service account's access to the agent)"
)
# A token is replaced this long before it expires (or at half its life if shorter).
REFRESH_MARGIN = 300.0

# google.rpc status names, for answers whose HTTP status alone is not enough.
BY_RPC_STATUS: dict[str, Outcome] = {
    # The user's device is not RCS-capable or not reachable through this agent.
    "NOT_FOUND": Outcome.CHANNEL,
    # Agent not launched on the user's carrier, or a tester who has not accepted.
    "PERMISSION_DENIED": Outcome.CHANNEL,
    "FAILED_PRECONDITION": Outcome.CHANNEL,
    "RESOURCE_EXHAUSTED": Outcome.TRANSIENT,
    "UNAVAILABLE": Outcome.TRANSIENT,
    "INTERNAL": Outcome.TRANSIENT,
    "DEADLINE_EXCEEDED": Outcome.TRANSIENT,
    "UNAUTHENTICATED": Outcome.TRANSIENT,
    "INVALID_ARGUMENT": Outcome.RECIPIENT,
}


class CredentialsError(RuntimeError):
    """The service-account key cannot be used (its content is never in the message).

    ``status`` is the token endpoint's HTTP status when it refused; a 429 or 5xx there
    is an outage of Google's, not a refusal of the key (``refused`` is False).
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def refused(self) -> bool:
        return self.status is None or not (self.status in (408, 425, 429) or self.status >= 500)


def check_key(key: dict[str, Any]) -> None:
    """Refuse a service-account key without the fields a token request needs."""
    missing = [k for k in ("client_email", "private_key", "token_uri") if not key.get(k)]
    if missing:
        raise CredentialsError(f"service-account key lacks {', '.join(missing)}")


def read_key(path: str) -> dict[str, Any]:
    """The service-account key file Google issues, checked (CredentialsError if unusable)."""
    try:
        key = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CredentialsError(f"cannot read the service-account key file {path}") from exc
    if not isinstance(key, dict):
        raise CredentialsError(f"{path} is not a service-account key")
    check_key(key)
    return key


class ServiceAccountTokens:
    """OAuth 2.0 access tokens for a Google service account, cached until near expiry."""

    def __init__(
        self,
        *,
        key: dict[str, Any],
        session: requests.Session,
        timeout: tuple[float, float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_key(key)
        self._key = key
        self._session = session
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0

    @classmethod
    def from_file(cls, path: str, **kwargs: Any) -> ServiceAccountTokens:
        """Load the key file Google issues for the service account."""
        return cls(key=read_key(path), **kwargs)

    def get(self) -> str:
        """A token valid for a while yet: the cached one, or a fresh one."""
        with self._lock:
            if self._token is None or self._clock() >= self._refresh_at:
                self._fetch()
            assert self._token is not None
            return self._token

    def invalidate(self, token: str) -> None:
        """Drop ``token`` (the API refused it) so the next get() fetches another."""
        with self._lock:
            if self._token == token:
                self._token = None

    def _fetch(self) -> None:
        # The assertion carries wall-clock times; when to refresh is measured on ``clock``
        # (monotonic), so a clock step on this host never keeps a stale token.
        now = self._clock()
        issued = int(time.time())
        assertion = jwt.encode(
            {
                "iss": self._key["client_email"],
                "scope": SCOPE,
                "aud": self._key["token_uri"],
                "iat": issued,
                "exp": issued + 3600,
            },
            self._key["private_key"],
            algorithm="RS256",
            headers={"kid": self._key.get("private_key_id", "")},
        )
        response = self._session.post(
            self._key["token_uri"],
            data={
                "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "assertion": assertion,
            },
            timeout=self._timeout,
        )
        body = errors.reply_json(response)
        if response.status_code != 200 or not isinstance(body, dict) or "access_token" not in body:
            # OAuth 2.0's error and its description (RFC 6749 5.2), never the assertion.
            said = body if isinstance(body, dict) else {}
            why = ": ".join(str(said[k])[:200] for k in ("error", "error_description") if k in said)
            raise CredentialsError(
                f"token endpoint answered {response.status_code}" + (f" ({why})" if why else ""),
                status=response.status_code,
            )
        lifetime = float(body.get("expires_in", 3600))
        self._token = str(body["access_token"])
        self._refresh_at = now + lifetime - min(REFRESH_MARGIN, lifetime / 2)


class RbmProvider(HttpVendor):
    name = "rbm"
    # A lost hand-off is sent again: the same messageId is refused as ALREADY_EXISTS
    # (counted as accepted) if it had reached RBM.
    resend_safe = True

    def __init__(
        self,
        *,
        agent_id: str,
        tokens: ServiceAccountTokens,
        api_url: str = DEFAULT_API_URL,
        ttl: float = 0.0,
        session: requests.Session,
        timeout: tuple[float, float],
        breaker: Breaker | None = None,
    ) -> None:
        if not agent_id:
            raise ValueError("the rbm provider needs DISPATCHER_RBM_AGENT_ID")
        self.agent_id = agent_id
        self.tokens = tokens
        self.api_url = api_url.rstrip("/")
        self.ttl = ttl
        self.session = session
        self.timeout = timeout
        self.breaker = breaker or Breaker()

    def hand_over(self, message: OutboundMessage) -> SendResult:
        refused = errors.too_long(
            message.body, limit=MAX_TEXT, code="rbm_text_too_long", service="RBM"
        )
        if refused is not None:
            return refused
        try:
            response = self._post(message)
            if response.status_code == 401:
                # A token revoked or expired early: one retry with a fresh one.
                response = self._post(message, fresh=True)
        except CredentialsError as exc:
            failed = errors.failure(Outcome.TRANSIENT, code="rbm_auth", text=str(exc))
            if not exc.refused:
                errors.warn_operator(self.name, "token", f"{exc}; {errors.WAITING}.")
                return failed
            return errors.refused_credentials(self.name, failed, check=KEY_FILE)
        except requests.RequestException as exc:
            return errors.network(exc, provider=self.name, resend_safe=self.resend_safe)
        if response.status_code == 200 or response.status_code == 409:
            # 409 ALREADY_EXISTS: this messageId was accepted by an earlier hand-off.
            return SendResult(Outcome.ACCEPTED, provider_message_id=message.recipient_id)
        body = errors.reply_json(response)
        error = body.get("error") if isinstance(body, dict) else None
        rpc = str(error.get("status", "")) if isinstance(error, dict) else ""
        text = str(error.get("message", "")) if isinstance(error, dict) else response.reason
        outcome = BY_RPC_STATUS.get(rpc) or errors.by_status(response.status_code)
        result = errors.failure(
            outcome,
            code=f"rbm_{response.status_code}" + (f"_{rpc}" if rpc else ""),
            text=text,
            retry_after=errors.retry_after(response.headers),
        )
        if response.status_code == 401:
            # Refused even with a fresh token: the service account lacks access to RBM.
            return errors.refused_credentials(self.name, result, check=KEY_FILE)
        return result

    def _post(self, message: OutboundMessage, *, fresh: bool = False) -> requests.Response:
        token = self.tokens.get()
        if fresh:
            self.tokens.invalidate(token)
            token = self.tokens.get()
        body: dict[str, Any] = {"contentMessage": {"text": message.body}}
        if self.ttl:
            # Revoked undelivered after this: TTL_EXPIRATION_REVOKED, then the next channel.
            body["ttl"] = f"{self.ttl:.0f}s"
        return self.session.post(
            f"{self.api_url}/v1/phones/{message.to}/agentMessages",
            params={"messageId": message.recipient_id, "agentId": self.agent_id},
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=self.timeout,
            allow_redirects=False,
        )


# Events that report a message's delivery (Google's "Receive events" page); IS_TYPING,
# user messages and the like concern no message sent here.
EVENT_STATUSES = {"DELIVERED": "delivered", "READ": "read"}
# The message's TTL passed and RBM took it back undelivered: Google's advice is to send
# it through another channel, so it falls back as a 404 at send time does.
REVOKED = "TTL_EXPIRATION_REVOKED"


def signature_ok(client_token: str, data: bytes, presented: str) -> bool:
    """Google's check: X-Goog-Signature is base64(HMAC-SHA512(client token, decoded data))."""
    digest = hmac.new(client_token.encode(), data, hashlib.sha512).digest()
    return hmac.compare_digest(base64.b64encode(digest), presented.strip().encode())


def receipts_from_event(event: object) -> list[Receipt]:
    """The receipt an RBM event carries, if it reports a message's status."""
    if not isinstance(event, dict):
        return []
    kind = event.get("eventType")
    ref = event.get("messageId")
    if not isinstance(ref, str) or not ref:
        return []
    if kind == REVOKED:
        text = "revoked by RBM after its TTL, undelivered"
        return [errors.late_failure(ref, Outcome.CHANNEL, code="rbm_ttl_revoked", text=text)]
    if kind not in EVENT_STATUSES:
        return []
    return [Receipt(ref[:100], EVENT_STATUSES[kind])]
