"""Meta WhatsApp Cloud API webhook: ``GET`` and ``POST /providers/whatsapp/webhook``.

Meta's "Webhooks" guide: the GET handshake (``hub.mode=subscribe``,
``hub.verify_token``, answered with ``hub.challenge``) and POST notifications
signed with ``X-Hub-Signature-256`` (HMAC-SHA256 of the raw body with the app
secret), checked before the body is parsed.
"""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, request

from api import context as ctx
from api.errors import register_on
from api.providers import common
from dispatcher.channels import whatsapp_cloud
from dispatcher.errors import ValidationError

blueprint = Blueprint("whatsapp_webhook", __name__, url_prefix="/providers/whatsapp")
register_on(blueprint)


@blueprint.get("/webhook")
def verify() -> Response:
    token = common.secret(ctx.settings().whatsapp_verify_token, "whatsapp")
    presented = request.args.get("hub.verify_token", "")
    if request.args.get("hub.mode") != "subscribe" or not hmac.compare_digest(
        presented.encode(), token.encode()
    ):
        raise common.refuse(
            "whatsapp", check="DISPATCHER_WHATSAPP_VERIFY_TOKEN", what="verify token"
        )
    challenge = request.args.get("hub.challenge", "")
    if not challenge or len(challenge) > 256:
        raise ValidationError("hub.challenge is required", field="hub.challenge")
    return Response(challenge, mimetype="text/plain")


@blueprint.post("/webhook")
def notify() -> dict[str, int]:
    secret = common.secret(ctx.settings().whatsapp_app_secret, "whatsapp")
    raw = request.get_data(cache=True)
    presented = request.headers.get("X-Hub-Signature-256", "")
    if not whatsapp_cloud.signature_ok(secret, raw, presented):
        raise common.refuse("whatsapp", check="DISPATCHER_WHATSAPP_APP_SECRET")
    items = whatsapp_cloud.receipts_from_notification(ctx.json_body())
    return common.record(provider="whatsapp_cloud", items=items)
