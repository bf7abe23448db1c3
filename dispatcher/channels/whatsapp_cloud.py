"""WhatsApp through Meta's WhatsApp Cloud API.

Follows Meta's public Cloud API reference: "Messages" (``POST
/{version}/{phone-number-id}/messages`` with a bearer token; text and template
messages), "Error codes" (``{"error": {"message", "type", "code",
"error_data": {"details"}, "fbtrace_id"}}``) and "Webhooks" (statuses, see
api/providers/whatsapp.py).

Each sending phone number id has its own token. A batch's sender picks the
phone number id through DISPATCHER_WHATSAPP_SENDERS (default:
DISPATCHER_WHATSAPP_PHONE_NUMBER_ID).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import requests

from dispatcher.channels import errors
from dispatcher.channels.base import OutboundMessage, Outcome, Receipt, SendResult
from dispatcher.channels.breaker import Breaker, HttpVendor

DEFAULT_API_URL = "https://graph.facebook.com/v21.0"
# The Cloud API's maximum for a text message body.
MAX_TEXT = 4096

T, C, R = Outcome.TRANSIENT, Outcome.CHANNEL, Outcome.RECIPIENT
# Meta's OAuthException 190: the access token is invalid or expired.
TOKEN_INVALID = 190
# Meta's 33: the business phone number has been deleted.
NUMBER_GONE = 33
# Meta's error codes, by what Dispatcher does with them. Unnamed codes: by HTTP status.
CODES: dict[int, Outcome] = {
    1: T,  # API unknown
    2: T,  # API service temporarily unavailable
    4: T,  # application request limit reached
    TOKEN_INVALID: T,  # the operator renews the token; messages wait
    80007: T,  # WhatsApp Business Account rate limit
    130429: T,  # Cloud API throughput reached
    131000: T,  # something went wrong
    131016: T,  # service unavailable
    131048: T,  # spam rate limit hit
    131056: T,  # too many messages to this recipient from this number
    131057: T,  # business account in maintenance mode
    133004: T,  # server temporarily unavailable
    131026: C,  # message undeliverable: not a WhatsApp user, old app, terms not accepted
    131047: C,  # re-engagement: more than 24 h since the user last wrote; send a template
    131049: C,  # not delivered to keep the ecosystem healthy
    131051: C,  # unsupported message type
    131031: C,  # business account locked
    131042: C,  # business payment issue
    130472: C,  # user's number is part of an experiment
    132000: C,  # template parameter count mismatch
    132001: C,  # template does not exist in that language
    132005: C,  # template hydrated text too long
    132007: C,  # template format character policy violated
    132012: C,  # template parameter format mismatch
    132015: C,  # template paused
    132016: C,  # template disabled
    100: R,  # invalid parameter (e.g. the number)
    131008: R,  # required parameter missing
    131009: R,  # parameter value not valid
    131021: R,  # recipient cannot be the sender
    131030: R,  # recipient not in the allowed list (test numbers)
    131050: R,  # user stopped marketing messages
}


def template_payload(template: Mapping[str, Any]) -> dict[str, Any]:
    """The Cloud API ``template`` object for a batch's ``whatsapp_template``."""
    payload: dict[str, Any] = {
        "name": template["name"],
        "language": {"code": template["language"]},
    }
    parameters = template.get("parameters") or []
    if parameters:
        payload["components"] = [
            {"type": "body", "parameters": [{"type": "text", "text": p} for p in parameters]}
        ]
    return payload


class WhatsAppCloudProvider(HttpVendor):
    name = "whatsapp_cloud"

    def __init__(
        self,
        *,
        tokens: Mapping[str, str],
        phone_number_id: str = "",
        senders: Mapping[str, str] | None = None,
        api_url: str = DEFAULT_API_URL,
        session: requests.Session,
        timeout: tuple[float, float],
        breaker: Breaker | None = None,
    ) -> None:
        if not tokens:
            raise ValueError("the whatsapp_cloud provider needs DISPATCHER_WHATSAPP_TOKENS")
        self.tokens = dict(tokens)
        self.phone_number_id = phone_number_id
        self.senders = dict(senders or {})
        self.api_url = api_url.rstrip("/")
        self.session = session
        self.timeout = timeout
        self.breaker = breaker or Breaker()

    def hand_over(self, message: OutboundMessage) -> SendResult:
        number_id = self.senders.get(message.sender, self.phone_number_id)
        token = self.tokens.get(number_id)
        if not number_id or not token:
            return errors.failure(
                Outcome.CHANNEL,
                code="whatsapp_no_number",
                text=f"no WhatsApp phone number id for sender {message.sender!r}",
            )
        payload: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": message.to.lstrip("+"),
        }
        if message.template:
            payload.update(type="template", template=template_payload(message.template))
        else:
            refused = errors.too_long(
                message.body, limit=MAX_TEXT, code="whatsapp_text_too_long", service="WhatsApp"
            )
            if refused is not None:
                return refused
            payload.update(type="text", text={"preview_url": False, "body": message.body})
        try:
            response = self.session.post(
                f"{self.api_url}/{number_id}/messages",
                json=payload,
                headers={"Authorization": f"Bearer {token}"},
                timeout=self.timeout,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            return errors.network(exc, provider=self.name)
        body = errors.reply_json(response)
        if response.status_code == 200 and isinstance(body, dict):
            ids = [m.get("id") for m in body.get("messages") or [] if isinstance(m, dict)]
            if ids and ids[0]:
                return SendResult(Outcome.ACCEPTED, provider_message_id=str(ids[0]))
        if 200 <= response.status_code < 300:
            return errors.failure(
                Outcome.TRANSIENT, code="whatsapp_bad_reply", text="no message id in the reply"
            )
        error = body.get("error") if isinstance(body, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        code = code if isinstance(code, int) else None
        text = response.reason
        if isinstance(error, dict):
            details = (
                (error.get("error_data") or {}).get("details")
                if isinstance(error.get("error_data"), dict)
                else None
            )
            text = str(details or error.get("message") or text)
        # Graph's "Object with ID ... does not exist" (100, subcode 33) or Meta's 33 (the
        # business number was deleted): the phone number id is wrong, not the recipient.
        subcode = error.get("error_subcode") if isinstance(error, dict) else None
        no_number = code == NUMBER_GONE or (code == 100 and subcode == 33)
        result = errors.failure(
            Outcome.CHANNEL if no_number else errors.classify(CODES, code, response.status_code),
            code=f"whatsapp_{code if code is not None else response.status_code}",
            text=text,
            retry_after=errors.retry_after(response.headers),
        )
        if no_number:
            errors.warn_operator(
                self.name,
                "number",
                f"no usable phone number id {number_id} ({result.error_code}: "
                f"{result.error_text}); the recipients fall back to their next channel. Check "
                "DISPATCHER_WHATSAPP_PHONE_NUMBER_ID and DISPATCHER_WHATSAPP_SENDERS, and that "
                "the token may send for it.",
            )
        elif code == TOKEN_INVALID or response.status_code == 401:
            check = f"DISPATCHER_WHATSAPP_TOKENS (the token of phone number id {number_id})"
            return errors.refused_credentials(self.name, result, check=check)
        return result


# Webhook statuses with a place in a recipient's life. "sent" (left for WhatsApp's
# servers) is already our "sent", recorded when the API accepted the message.
STATUSES = {"delivered": "delivered", "read": "read", "failed": "failed"}


def signature_ok(app_secret: str, body: bytes, presented: str) -> bool:
    """Meta's check: X-Hub-Signature-256 is ``sha256=`` + hex HMAC-SHA256(app secret, raw body)."""
    expected = "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), presented.strip().encode())


def receipts_from_notification(body: object) -> list[Receipt]:
    """The receipts in a webhook notification (``entry[].changes[].value.statuses[]``)."""
    out: list[Receipt] = []
    entries = body.get("entry") if isinstance(body, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        changes = entry.get("changes") if isinstance(entry, dict) else None
        for change in changes if isinstance(changes, list) else []:
            value = change.get("value") if isinstance(change, dict) else None
            statuses = value.get("statuses") if isinstance(value, dict) else None
            for item in statuses if isinstance(statuses, list) else []:
                receipt = _receipt(item)
                if receipt is not None:
                    out.append(receipt)
    return out


def _receipt(item: object) -> Receipt | None:
    if not isinstance(item, dict):
        return None
    ref, status = item.get("id"), STATUSES.get(str(item.get("status")))
    if not isinstance(ref, str) or not ref or status is None:
        return None
    if status != "failed":
        return Receipt(ref[:100], status)
    errs = item.get("errors")
    first = errs[0] if isinstance(errs, list) and errs and isinstance(errs[0], dict) else {}
    data = first.get("error_data")
    details = data.get("details") if isinstance(data, dict) else None
    code = first.get("code") if isinstance(first.get("code"), int) else None
    # A code that refuses the channel at send time refuses it here too: fall back.
    return errors.late_failure(
        ref,
        CODES.get(code) if code is not None else None,
        code=f"whatsapp_{code}" if code is not None else "whatsapp_failed",
        text=str(details or first.get("message") or first.get("title") or ""),
    )
