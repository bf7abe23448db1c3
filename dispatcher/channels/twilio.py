"""Twilio's Programmable Messaging API as an upstream carrier (SMS, and WhatsApp).

Follows Twilio's public docs: "Message resource" (form-encoded ``POST
/2010-04-01/Accounts/{AccountSid}/Messages.json`` with HTTP basic auth, 201 and
the Message's ``sid``), "Errors and warnings" (``{"code", "message",
"more_info", "status"}``), "Track the message status of outbound messages"
(``StatusCallback``) and "Webhooks security" (``X-Twilio-Signature``, see
api/providers/twilio.py). WhatsApp goes through ``whatsapp:``-prefixed addresses.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections import defaultdict
from collections.abc import Iterable, Mapping

import requests

from dispatcher.channels import errors
from dispatcher.channels.base import OutboundMessage, Outcome, Receipt, SendResult
from dispatcher.channels.breaker import Breaker, HttpVendor

DEFAULT_API_URL = "https://api.twilio.com"
STATUS_PATH = "/providers/twilio/status"

T, C, R = Outcome.TRANSIENT, Outcome.CHANNEL, Outcome.RECIPIENT
# Twilio's "Authenticate": our Account SID or auth token is wrong.
AUTHENTICATE = 20003
# Refusals of the sender, which the operator should hear of (see CODES).
SENDER_REFUSED = frozenset({21212, 21606, 21657, 21659, 21660, 63007})
# Twilio's error codes, by what Dispatcher does with them. Unnamed codes: by HTTP status.
CODES: dict[int, Outcome] = {
    AUTHENTICATE: T,  # the operator fixes the credentials; messages wait
    20429: T,  # too many requests
    20500: T,  # internal server error
    20503: T,  # service unavailable
    30001: T,  # queue overflow
    21408: C,  # permission to send to this region not enabled
    # The sender cannot send here (the batch's from, or the account's setup): a retry
    # will not change that, and neither is it the recipient's fault; the next channel may.
    21212: C,  # invalid From number
    21606: C,  # From is not a message-capable number of this account
    21657: C,  # alphanumeric sender ID not supported (or not registered) for the destination
    21659: C,  # From is not a Twilio number
    21660: C,  # From belongs to another account
    63007: C,  # WhatsApp: no channel for the From address
    21612: C,  # cannot route to this number from this sender
    63003: C,  # WhatsApp: the To address is not on the channel
    63016: C,  # WhatsApp: outside the 24 h window and not a template
    63024: C,  # WhatsApp: invalid message recipient
    63032: C,  # WhatsApp: the user's number is part of an experiment (Meta's 130472)
    21211: R,  # invalid To number
    21610: R,  # recipient replied STOP
    21614: R,  # To is not a mobile number
    21217: R,  # phone number does not appear to be valid
    30003: R,  # unreachable destination handset
    30005: R,  # unknown destination handset
    30006: R,  # landline or unreachable carrier
    30007: R,  # message filtered by the carrier
}


def signature(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """Twilio's X-Twilio-Signature: HMAC-SHA1 of the URL and the sorted POST parameters.

    Names in order, each name's distinct values in order, as Twilio's own validator does.
    """
    values: dict[str, set[str]] = defaultdict(set)
    for name, value in params:
        values[name].add(value)
    data = url + "".join(name + v for name in sorted(values) for v in sorted(values[name]))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


class TwilioProvider(HttpVendor):
    name = "twilio"

    def __init__(
        self,
        *,
        account_sid: str,
        auth_token: str,
        status_callback: str = "",
        messaging_service_sid: str = "",
        api_url: str = DEFAULT_API_URL,
        session: requests.Session,
        timeout: tuple[float, float],
        breaker: Breaker | None = None,
    ) -> None:
        if not account_sid or not auth_token:
            raise ValueError(
                "the twilio provider needs DISPATCHER_TWILIO_ACCOUNT_SID and _AUTH_TOKEN"
            )
        self.account_sid = account_sid
        self._auth = (account_sid, auth_token)
        self.status_callback = status_callback
        self.messaging_service_sid = messaging_service_sid
        self.url = f"{api_url.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Messages.json"
        self.session = session
        self.timeout = timeout
        self.breaker = breaker or Breaker()

    def hand_over(self, message: OutboundMessage) -> SendResult:
        prefix = "whatsapp:" if message.channel == "whatsapp" else ""
        form = {"To": prefix + message.to, "Body": message.body}
        if self.messaging_service_sid and not prefix:
            form["MessagingServiceSid"] = self.messaging_service_sid
        else:
            form["From"] = prefix + message.sender
        if self.status_callback:
            form["StatusCallback"] = self.status_callback
        try:
            response = self.session.post(
                self.url,
                data=form,
                auth=self._auth,
                timeout=self.timeout,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            return errors.network(exc, provider=self.name)
        body = errors.reply_json(response)
        if response.status_code in (200, 201) and isinstance(body, dict) and body.get("sid"):
            return SendResult(Outcome.ACCEPTED, provider_message_id=str(body["sid"]))
        if 200 <= response.status_code < 300:
            return errors.failure(
                Outcome.TRANSIENT, code="twilio_bad_reply", text="no message sid in the reply"
            )
        code = body.get("code") if isinstance(body, dict) else None
        code = code if isinstance(code, int) else None
        text = str(body.get("message") or "") if isinstance(body, dict) else ""
        result = errors.failure(
            errors.classify(CODES, code, response.status_code),
            code=f"twilio_{code if code is not None else response.status_code}",
            text=text or response.reason,
            retry_after=errors.retry_after(response.headers),
        )
        if code == AUTHENTICATE or response.status_code == 401:
            check = "DISPATCHER_TWILIO_ACCOUNT_SID and DISPATCHER_TWILIO_AUTH_TOKEN"
            return errors.refused_credentials(self.name, result, check=check)
        if code in SENDER_REFUSED:
            errors.warn_operator(
                self.name,
                f"sender {code}",
                f"Twilio refused the sender {form.get('From', '')!r} ({result.error_code}: "
                f"{result.error_text}); the recipients fall back to their next channel. Send "
                "from a sender of this Twilio account, or set "
                "DISPATCHER_TWILIO_MESSAGING_SERVICE_SID to let Twilio pick one.",
            )
        return result


# MessageStatus values with a place in a recipient's life; queued, accepted,
# sending, sent and scheduled are all before or at our own "sent".
STATUSES = {"delivered": "delivered", "read": "read", "undelivered": "failed", "failed": "failed"}


def signature_ok(
    auth_token: str, url: str, params: Iterable[tuple[str, str]], presented: str
) -> bool:
    """Whether ``presented`` is Twilio's signature of this request."""
    expected = signature(auth_token, url, params)
    return hmac.compare_digest(expected.encode(), presented.strip().encode())


def receipt_from_callback(form: Mapping[str, str]) -> Receipt | None:
    """The receipt a StatusCallback carries, if its status is one we record."""
    ref, status = form.get("MessageSid"), STATUSES.get(form.get("MessageStatus", ""))
    if not ref or status is None:
        return None
    if status != "failed":
        return Receipt(ref[:100], status)
    code = form.get("ErrorCode") or ""
    # Twilio's codes are five ASCII digits; str.isdigit alone takes "²", which int()
    # refuses, and int() refuses over 4,300 digits.
    number = int(code) if code.isascii() and code.isdigit() and len(code) < 10 else None
    # A code that refuses the channel at send time (63016 outside the WhatsApp window,
    # 63003 not on WhatsApp) refuses it here too: fall back to the next channel.
    return errors.late_failure(
        ref,
        CODES.get(number) if number is not None else None,
        code=f"twilio_{code}" if code else "twilio_failed",
        text=form.get("ErrorMessage") or form.get("MessageStatus"),
    )
