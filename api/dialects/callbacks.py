"""Callbacks of the native dialect: list them, replay dead ones, see and re-enable endpoints.

Pages count from 0, as in every native listing (the service counts from 1).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, request
from marshmallow import RAISE, Schema, fields, validate

from api import context as ctx
from api.dialects.mplus.dump import iso
from api.errors import register_on
from api.fields import Text, path_ref
from dispatcher.db import utcnow
from dispatcher.webhooks import queries
from dispatcher.webhooks.models import Callback, Endpoint

blueprint = Blueprint("callbacks", __name__, url_prefix="/callbacks")
register_on(blueprint)


class ListQuery(Schema):
    """?state=&page=&pageSize= of GET /callbacks."""

    class Meta:
        unknown = RAISE

    key = fields.String()
    state = fields.String(
        load_default=None, validate=validate.OneOf([s.value for s in queries.CallbackState])
    )
    page = fields.Integer(load_default=0, validate=validate.Range(min=0, max=1_000_000))
    page_size = fields.Integer(
        load_default=100,
        data_key="pageSize",
        validate=validate.Range(min=1, max=queries.MAX_PAGE_SIZE),
    )


class KeyQuery(Schema):
    """Only ?key= (the API key) is allowed in the query string."""

    class Meta:
        unknown = RAISE

    key = fields.String()


class EnableBody(Schema):
    """Body of POST /callbacks/endpoints/enable."""

    class Meta:
        unknown = RAISE

    url = Text(required=True, validate=validate.Length(min=1, max=2048))


def dump_callback(c: Callback) -> dict[str, Any]:
    """One callback with its delivery state and the payload it carries."""
    return {
        "id": c.id,
        "eventType": c.event_type,
        "state": c.state,
        "url": c.url,
        "batchUuid": c.batch_id,
        "messageUuid": c.recipient_id,
        "attempts": c.attempts,
        "nextAttemptAt": iso(c.next_attempt_at),
        "lastStatus": c.last_status,
        "lastError": c.last_error,
        "createdAt": iso(c.created_at),
        "deliveredAt": iso(c.delivered_at),
        "payload": c.payload,
    }


def dump_endpoint(e: Endpoint) -> dict[str, Any]:
    """One callback URL and its health."""
    return {
        "url": e.url,
        "enabled": e.disabled_at is None,
        "failingSince": iso(e.failing_since),
        "disabledAt": iso(e.disabled_at),
    }


@blueprint.get("")
def list_callbacks() -> dict[str, Any]:
    query = ListQuery().load(request.args)
    rows, total = queries.list_callbacks(
        session=ctx.session(),
        account_id=ctx.account().id,
        state=query["state"],
        page=query["page"] + 1,
        page_size=query["page_size"],
    )
    return {
        "page": query["page"],
        "pageSize": query["page_size"],
        "total": total,
        "callbacks": [dump_callback(c) for c in rows],
    }


@blueprint.post("/<callback_id>/retry")
def retry_callback(callback_id: str) -> dict[str, Any]:
    KeyQuery().load(request.args)
    callback = queries.retry_callback(
        session=ctx.session(),
        account_id=ctx.account().id,
        callback_id=path_ref(callback_id, what="callback"),
        now=utcnow(),
    )
    return dump_callback(callback)


@blueprint.get("/endpoints")
def list_endpoints() -> dict[str, Any]:
    KeyQuery().load(request.args)
    rows = queries.list_endpoints(session=ctx.session(), account_id=ctx.account().id)
    return {"endpoints": [dump_endpoint(e) for e in rows]}


@blueprint.post("/endpoints/enable")
def enable_endpoint() -> dict[str, Any]:
    KeyQuery().load(request.args)
    account = ctx.account()
    data = EnableBody().load(ctx.json_body())
    released = queries.enable_endpoint(
        session=ctx.session(),
        account_id=account.id,
        url=data["url"],
        now=utcnow(),
        batch_size=ctx.settings().callback_batch_size,
    )
    return {"url": data["url"], "enabled": True, "released": released}
