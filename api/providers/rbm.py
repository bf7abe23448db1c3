"""Google RBM's webhook: ``POST /providers/rbm/events``.

Google's "Webhooks" page: the console's verification POST
``{"clientToken", "secret"}`` is answered with the secret as plain text; every
event comes as a Pub/Sub push ``{"message": {"data": base64(event JSON)}}``
signed with ``X-Goog-Signature`` = base64(HMAC-SHA512(client token, decoded data)).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from typing import Any

from flask import Blueprint, Response, request
from marshmallow import RAISE, Schema, validate

from api import context as ctx
from api.errors import register_on
from api.fields import Text
from api.providers import common
from dispatcher.channels import rbm
from dispatcher.errors import ValidationError

blueprint = Blueprint("rbm_webhook", __name__, url_prefix="/providers/rbm")
register_on(blueprint)


class Verification(Schema):
    """The console's verification POST: the client token, and the secret to answer with."""

    class Meta:
        unknown = RAISE

    clientToken = Text(required=True)
    secret = Text(required=True, validate=validate.Length(min=1, max=1024))


def event_data(body: Any) -> bytes:
    """The decoded ``message.data`` of a push (the bytes Google signed)."""
    message = body.get("message") if isinstance(body, dict) else None
    data = message.get("data") if isinstance(message, dict) else None
    if not isinstance(data, str):
        raise ValidationError("expected a push message with message.data", field="message.data")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValidationError("message.data is not base64", field="message.data") from exc


def parse_event(data: bytes) -> Any:
    """The signed event's JSON."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ValidationError("message.data is not a JSON event", field="message.data") from exc


@blueprint.post("/events")
def events() -> Response | dict[str, int]:
    token = common.secret(ctx.settings().rbm_client_token, "rbm")
    body = ctx.json_body()
    if isinstance(body, dict) and set(body) == {"clientToken", "secret"}:
        # Loaded first: a lone surrogate cannot be encoded, nor a non-string echoed.
        verification = Verification().load(body)
        if not hmac.compare_digest(verification["clientToken"].encode(), token.encode()):
            raise common.refuse("rbm", check="DISPATCHER_RBM_CLIENT_TOKEN")
        return Response(verification["secret"], mimetype="text/plain")
    data = event_data(body)
    if not rbm.signature_ok(token, data, request.headers.get("X-Goog-Signature", "")):
        raise common.refuse("rbm", check="DISPATCHER_RBM_CLIENT_TOKEN")
    return common.record(provider="rbm", items=rbm.receipts_from_event(parse_event(data)))
