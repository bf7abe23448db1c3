"""A stand-in for Google's RCS Business Messaging API and its OAuth 2.0 token endpoint.

Follows Google's public docs: "Authenticate API calls" / OAuth 2.0 for
server-to-server applications (``POST token_uri`` with
``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`` and an RS256
assertion; ``{"access_token", "expires_in", "token_type"}``), the REST
reference ``phones.agentMessages.create`` (``POST
/v1/phones/{msisdn}/agentMessages?messageId=&agentId=``), "Check RCS
capability" (404 NOT_FOUND), google.rpc error bodies, and "Webhooks" (Pub/Sub
push envelope signed with X-Goog-Signature).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import re
from typing import Any

import jwt
import requests

from tests.standins import Reply, Request, StandIn

AGENT_PATH = re.compile(r"^/v1/phones/(?P<msisdn>\+\d+)/agentMessages$")


def rpc_error(code: int, status: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status}}


class Rbm(StandIn):
    def __init__(self, *, public_key: Any, token_lifetime: int = 3600, port: int = 0) -> None:
        super().__init__(port=port)
        self.public_key = public_key
        self.token_lifetime = token_lifetime
        self.valid_tokens: set[str] = set()
        self.numbers = itertools.count(1)
        self.not_capable: set[str] = set()
        # msisdn -> (HTTP status, rpc status, Retry-After)
        self.refuse: dict[str, tuple[int, str, str | None]] = {}
        self.accepted: dict[str, dict[str, Any]] = {}
        # The token endpoint's answer while it is down (status, OAuth error); None: up.
        self.token_down: tuple[int, str] | None = None

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def revoke_tokens(self) -> None:
        with self.lock:
            self.valid_tokens.clear()

    def handle(self, request: Request) -> Reply:
        if request.path == "/token":
            return self._token(request)
        match = AGENT_PATH.match(request.path)
        if request.method != "POST" or match is None:
            return Reply(404, rpc_error(404, "NOT_FOUND", "Method not found."))
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if token not in self.valid_tokens:
            return Reply(
                401,
                rpc_error(
                    401, "UNAUTHENTICATED", "Request had invalid authentication credentials."
                ),
            )
        msisdn = match["msisdn"]
        message_id = (request.query.get("messageId") or [""])[0]
        if not message_id or not request.query.get("agentId"):
            return Reply(400, rpc_error(400, "INVALID_ARGUMENT", "messageId and agentId needed"))
        if msisdn in self.not_capable:
            return Reply(404, rpc_error(404, "NOT_FOUND", "Requested entity was not found."))
        if msisdn in self.refuse:
            status, rpc, after = self.refuse[msisdn]
            headers = {"Retry-After": after} if after else {}
            return Reply(status, rpc_error(status, rpc, f"refused: {rpc}"), headers)
        if message_id in self.accepted:
            return Reply(409, rpc_error(409, "ALREADY_EXISTS", "Message already exists."))
        body = {
            "name": f"phones/{msisdn}/agentMessages/{message_id}",
            "sendTime": "2026-01-01T00:00:00Z",
            "contentMessage": request.json()["contentMessage"],
        }
        self.accepted[message_id] = body
        reply = Reply(200, body)
        if self.before_reply is not None:
            self.before_reply(request, reply)
        return reply

    def _token(self, request: Request) -> Reply:
        if self.token_down is not None:
            status, error = self.token_down
            return Reply(status, {"error": error, "error_description": "Try again later."})
        form = {k: v[0] for k, v in request.form().items()}
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return Reply(400, {"error": "unsupported_grant_type"})
        try:
            claims = jwt.decode(
                form.get("assertion", ""),
                self.public_key,
                algorithms=["RS256"],
                audience=self.token_uri,
            )
        except jwt.InvalidTokenError:
            return Reply(400, {"error": "invalid_grant", "error_description": "Invalid JWT"})
        if "rcsbusinessmessaging" not in claims.get("scope", ""):
            return Reply(400, {"error": "invalid_scope"})
        token = f"ya29.stand-in-{next(self.numbers)}"
        with self.lock:
            self.valid_tokens.add(token)
        return Reply(
            200,
            {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"},
        )


def push(
    url: str, event: dict[str, Any], *, client_token: str, signature: str | None = None
) -> requests.Response:
    """POST one event to a webhook as RBM does: Pub/Sub envelope, X-Goog-Signature."""
    data = json.dumps(event).encode()
    if signature is None:
        digest = hmac.new(client_token.encode(), data, hashlib.sha512).digest()
        signature = base64.b64encode(digest).decode()
    envelope = {
        "message": {
            "data": base64.b64encode(data).decode(),
            "messageId": "pubsub-1",
            "publishTime": "2026-01-01T00:00:00Z",
        },
        "subscription": "projects/rbm-agent/subscriptions/rbm-agent-sub",
    }
    return requests.post(url, json=envelope, headers={"X-Goog-Signature": signature}, timeout=10)


def event(kind: str, message_id: str, number: str = "+447700900001") -> dict[str, Any]:
    """A user event as Google's "Receive events" page shows it."""
    return {
        "senderPhoneNumber": number,
        "eventType": kind,
        "eventId": f"evt-{kind}-{message_id}",
        "messageId": message_id,
        "sendTime": "2026-01-01T00:00:01Z",
        "agentId": "dispatcher-agent@rbm.goog",
    }


def write_key_file(path: Any, private_key: Any, token_uri: str) -> None:
    """A service-account key file as Google issues it, its token_uri on the stand-in."""
    from cryptography.hazmat.primitives import serialization

    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "rbm-agent",
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": "dispatcher@rbm-agent.iam.gserviceaccount.com",
                "token_uri": token_uri,
            }
        )
    )
