"""Inbound delivery receipts from carriers: ``POST /dlr/<provider>``.

A carrier authenticates with its provider's shared secret (``DISPATCHER_DLR_SECRETS``)
as ``Authorization: Bearer <secret>``. The reply comes after the receipts are
committed: applied, or kept (``pending``) until their message's outcome is
recorded. Receipts for messages already final are acknowledged as ignored, so a
carrier never retries them forever.
"""

from __future__ import annotations

import hmac
from typing import Any

from flask import Blueprint, request
from marshmallow import RAISE, Schema, ValidationError, fields, validate

from api import context as ctx
from api.errors import register_on
from api.fields import Text, Timestamp
from dispatcher.db import utcnow
from dispatcher.errors import NotFound, Unauthenticated
from dispatcher.receipts import service as receipts

blueprint = Blueprint("dlr", __name__, url_prefix="/dlr")
register_on(blueprint)

# Providers whose carriers post receipts here (the simulator emits its own in process).
PROVIDERS = frozenset({"http"})
MAX_RECEIPTS = 1000


class ErrorSchema(Schema):
    class Meta:
        unknown = RAISE

    code = Text(load_default=None, validate=validate.Length(max=32))
    text = Text(load_default=None, validate=validate.Length(max=500))


class ReceiptSchema(Schema):
    """One receipt: the carrier's message id, its final status and an optional error."""

    class Meta:
        unknown = RAISE

    id = Text(required=True, validate=validate.Length(min=1, max=100))
    status = fields.String(
        required=True, validate=validate.OneOf(sorted(receipts.RECEIPT_STATUSES))
    )
    error = fields.Nested(ErrorSchema, load_default=None, allow_none=True)
    # The carrier's time of the final state (SMPP "done date"), ISO 8601 with a zone.
    done_at = Timestamp(load_default=None, allow_none=True)


def authenticate(provider: str) -> None:
    """Check the provider's shared secret; an unconfigured provider does not exist here."""
    secret = ctx.settings().dlr_secrets.get(provider)
    if provider not in PROVIDERS or not secret:
        raise NotFound(f"no receipt endpoint for provider {provider!r}")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    presented = token.strip().encode() if scheme.lower() == "bearer" else b""
    # Compared as bytes: compare_digest refuses non-ASCII str, and timing must not leak.
    if not hmac.compare_digest(presented, secret.encode()):
        raise Unauthenticated("missing or wrong receipt secret: pass Authorization: Bearer")


def parse(body: object) -> list[dict[str, Any]]:
    """One receipt object, or a list of 1 to MAX_RECEIPTS of them."""
    if isinstance(body, list):
        if not 1 <= len(body) <= MAX_RECEIPTS:
            raise ValidationError(f"must hold 1 to {MAX_RECEIPTS} receipts", "receipts")
        return ReceiptSchema(many=True).load(body)
    return [ReceiptSchema().load(body)]  # type: ignore[arg-type]


@blueprint.post("/<provider>")
def receive(provider: str) -> dict[str, int]:
    authenticate(provider)
    items = parse(ctx.json_body())
    accepted = receipts.accept(
        session=ctx.session(),
        provider=provider,
        receipts=[
            receipts.Receipt(
                provider_message_id=r["id"],
                status=r["status"],
                error_code=(r["error"] or {}).get("code"),
                error_text=(r["error"] or {}).get("text"),
                done_at=r["done_at"],
            )
            for r in items
        ],
        now=utcnow(),
    )
    return accepted.as_dict()
