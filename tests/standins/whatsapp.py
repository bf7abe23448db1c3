"""A stand-in for Meta's WhatsApp Cloud API.

Follows Meta's public Cloud API reference: "Messages" (``POST
/{version}/{phone-number-id}/messages``, bearer token, the reply
``{"messaging_product", "contacts", "messages": [{"id": "wamid..."}]}``),
"Error codes" (``{"error": {"message", "type", "code", "error_data",
"fbtrace_id"}}``, e.g. 131026, 131047, 130429, 190) and "Webhooks"
(notifications with ``entry[].changes[].value.statuses[]``, signed with
``X-Hub-Signature-256``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import uuid
from typing import Any

import requests

from tests.standins import Reply, Request, StandIn

VERSION = "v21.0"
PATH = re.compile(rf"^/{VERSION}/(?P<number_id>\d+)/messages$")

ERRORS = {
    131026: "Message undeliverable",
    131047: "Re-engagement message",
    130429: "Rate limit hit",
    131000: "Something went wrong",
    131021: "Recipient cannot be sender",
    132001: "Template name does not exist in the translation",
}


def error(code: int, status: int = 400) -> Reply:
    return Reply(
        status,
        {
            "error": {
                "message": f"({code}) {ERRORS.get(code, 'Error')}",
                "type": "OAuthException",
                "code": code,
                "error_data": {
                    "messaging_product": "whatsapp",
                    "details": f"{ERRORS.get(code, 'Error')} (details)",
                },
                "fbtrace_id": "AbCdEf123",
            }
        },
    )


class WhatsApp(StandIn):
    def __init__(self, *, tokens: dict[str, str], port: int = 0) -> None:
        super().__init__(port=port)
        self.tokens = tokens
        # wa number (no +) -> error code answered for text messages / for everything
        self.text_errors: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.templates = {("order_update", "en_US")}

    @property
    def api_url(self) -> str:
        return f"{self.url}/{VERSION}"

    def handle(self, request: Request) -> Reply:
        match = PATH.match(request.path)
        if request.method != "POST" or match is None:
            return error(100)
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if match["number_id"] not in self.tokens:
            # Graph's answer for an id that names no object this token may use.
            return Reply(
                400,
                {
                    "error": {
                        "message": f"Unsupported post request. Object with ID "
                        f"'{match['number_id']}' does not exist, cannot be loaded due to "
                        "missing permissions, or does not support this operation.",
                        "type": "GraphMethodException",
                        "code": 100,
                        "error_subcode": 33,
                        "fbtrace_id": "AbCdEf123",
                    }
                },
            )
        if self.tokens[match["number_id"]] != token:
            return Reply(401, error(190).body)
        body = request.json()
        to = body.get("to", "")
        if body.get("messaging_product") != "whatsapp" or not to.isdigit():
            return error(100)
        if to in self.errors:
            return error(self.errors[to])
        if body.get("type") == "text" and to in self.text_errors:
            return error(self.text_errors[to])
        if body.get("type") == "template":
            t = body["template"]
            if (t["name"], t["language"]["code"]) not in self.templates:
                return error(132001)
        reply = Reply(
            200,
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": to, "wa_id": to}],
                "messages": [{"id": f"wamid.HBgL{uuid.uuid4().hex}"}],
            },
        )
        if self.before_reply is not None:
            self.before_reply(request, reply)
        return reply


def status(message_id: str, state: str, *, code: int | None = None) -> dict[str, Any]:
    """One ``statuses[]`` item as Meta's webhook reference shows it."""
    item: dict[str, Any] = {
        "id": message_id,
        "status": state,
        "timestamp": "1767225600",
        "recipient_id": "447700900001",
    }
    if code is not None:
        item["errors"] = [
            {
                "code": code,
                "title": ERRORS.get(code, "Error"),
                "message": ERRORS.get(code, "Error"),
                "error_data": {"details": f"{ERRORS.get(code, 'Error')} (details)"},
            }
        ]
    return item


def notify(
    url: str, statuses: list[dict[str, Any]], *, app_secret: str, signature: str | None = None
) -> requests.Response:
    """POST a statuses notification as Meta does, signed with the app secret."""
    body = json.dumps(
        {
            "object": "whatsapp_business_account",
            "entry": [
                {
                    "id": "102290129340398",
                    "changes": [
                        {
                            "value": {
                                "messaging_product": "whatsapp",
                                "metadata": {
                                    "display_phone_number": "15550783881",
                                    "phone_number_id": "106540352242922",
                                },
                                "statuses": statuses,
                            },
                            "field": "messages",
                        }
                    ],
                }
            ],
        }
    ).encode()
    if signature is None:
        signature = "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()
    return requests.post(
        url,
        data=body,
        headers={"Content-Type": "application/json", "X-Hub-Signature-256": signature},
        timeout=10,
    )
