"""A stand-in for Twilio's Programmable Messaging API.

Follows Twilio's public docs: "Message resource" (form-encoded ``POST
/2010-04-01/Accounts/{AccountSid}/Messages.json``, HTTP basic auth with the
Account SID and Auth Token, 201 with the Message JSON), "Errors and warnings"
(``{"code", "message", "more_info", "status"}``: 20003, 20429, 21211, 63016...),
and "Track the message status" (StatusCallback form posts signed with
X-Twilio-Signature, made here by the twilio package's own RequestValidator).
"""

from __future__ import annotations

import base64
import re
import uuid
from typing import Any

import requests
from twilio.request_validator import RequestValidator

from tests.standins import Reply, Request, StandIn

PATH = re.compile(r"^/2010-04-01/Accounts/(?P<sid>AC\w+)/Messages\.json$")


def error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(
        status,
        {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
        headers or {},
    )


class Twilio(StandIn):
    def __init__(self, *, account_sid: str, auth_token: str, port: int = 0) -> None:
        super().__init__(port=port)
        self.account_sid = account_sid
        self.auth_token = auth_token
        # To -> error reply
        self.errors: dict[str, Reply] = {}
        # The senders this account owns ("From" without its whatsapp: prefix); None: any.
        self.senders: set[str] | None = None

    def handle(self, request: Request) -> Reply:
        match = PATH.match(request.path)
        if request.method != "POST" or match is None:
            return error(404, 20404, "The requested resource was not found")
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        if (
            match["sid"] != self.account_sid
            or request.headers.get("authorization") != f"Basic {expected}"
        ):
            return error(401, 20003, "Authenticate")
        form = {k: v[0] for k, v in request.form().items()}
        to = form.get("To", "")
        if not form.get("Body") or not (form.get("From") or form.get("MessagingServiceSid")):
            return error(400, 21602, "Message body is required.")
        if not re.fullmatch(r"(whatsapp:)?\+\d{6,15}", to):
            return error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        sender = form.get("From")
        if sender and self.senders is not None and sender.split(":")[-1] not in self.senders:
            if sender.startswith("whatsapp:"):
                text = "Twilio could not find a Channel with the specified From address"
                return error(400, 63007, text)
            return error(
                400,
                21606,
                f"The From phone number {sender} is not a valid, SMS-capable inbound phone "
                "number or short code for your account.",
            )
        if to in self.errors:
            return self.errors[to]
        sid = f"SM{uuid.uuid4().hex}"
        reply = Reply(
            201,
            {
                "sid": sid,
                "account_sid": self.account_sid,
                "to": to,
                "from": form.get("From"),
                "messaging_service_sid": form.get("MessagingServiceSid"),
                "body": form["Body"],
                "status": "queued",
                "num_segments": "1",
                "direction": "outbound-api",
                "api_version": "2010-04-01",
                "error_code": None,
                "error_message": None,
                "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
            },
        )
        if self.before_reply is not None:
            self.before_reply(request, reply)
        return reply


def callback(
    url: str,
    params: dict[str, Any],
    *,
    auth_token: str,
    signature: str | None = None,
) -> requests.Response:
    """POST a StatusCallback as Twilio does, signed by Twilio's own RequestValidator."""
    if signature is None:
        signature = RequestValidator(auth_token).compute_signature(url, params)
    return requests.post(url, data=params, headers={"X-Twilio-Signature": signature}, timeout=10)


def status_params(
    sid: str, status: str, *, account_sid: str, error_code: str | None = None
) -> dict[str, str]:
    """The form fields of a StatusCallback (Twilio's "Message status callback" list)."""
    params = {
        "AccountSid": account_sid,
        "ApiVersion": "2010-04-01",
        "From": "+15005550006",
        "MessageSid": sid,
        "MessageStatus": status,
        "SmsSid": sid,
        "SmsStatus": status,
        "To": "+447700900001",
    }
    if error_code:
        params["ErrorCode"] = error_code
    return params
