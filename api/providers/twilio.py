"""Twilio's StatusCallback: ``POST /providers/twilio/status``.

Twilio's "Webhooks security": ``X-Twilio-Signature`` is checked against the
URL Twilio was given (DISPATCHER_PUBLIC_BASE_URL + path and query, since a
proxy may change what this process sees) and the form parameters.
"""

from __future__ import annotations

from flask import Blueprint, request

from api import context as ctx
from api.errors import register_on
from api.providers import common
from dispatcher.channels import twilio

blueprint = Blueprint("twilio_webhook", __name__, url_prefix="/providers/twilio")
register_on(blueprint)


def public_url() -> str:
    """The URL Twilio signed: the configured public base, this path and its query."""
    base = (ctx.settings().public_base_url or request.host_url).rstrip("/")
    query = request.query_string.decode("latin-1")
    return f"{base}{request.path}" + (f"?{query}" if query else "")


@blueprint.post("/status")
def status() -> dict[str, int]:
    token = common.secret(ctx.settings().twilio_auth_token, "twilio")
    params = list(request.form.items(multi=True))
    presented = request.headers.get("X-Twilio-Signature", "")
    if not twilio.signature_ok(token, public_url(), params, presented):
        raise common.refuse(
            "twilio",
            check="DISPATCHER_TWILIO_AUTH_TOKEN, and that DISPATCHER_PUBLIC_BASE_URL is the"
            f" URL Twilio posts to (this one was checked as {public_url()!r})",
        )
    receipt = twilio.receipt_from_callback(request.form)
    return common.record(provider="twilio", items=[receipt] if receipt else [])
