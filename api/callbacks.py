"""Callbacks of the native dialect: list them, replay dead ones, see and re-enable endpoints.

Pages count from 0, as in every native listing (the service counts from 1).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, request
from marshmallow import RAISE, Schema, fields, validate

from api import context as ctx
from api.dialects.mplus.replies import IsoZ, Page
from api.dialects.mplus.schemas import KeyQuery
from api.errors import register_on
from api.fields import Text, path_ref
from dispatcher.db import utcnow
from dispatcher.webhooks import queries
from dispatcher.webhooks.models import Callback, Endpoint

blueprint = Blueprint("callbacks", __name__, url_prefix="/callbacks")
register_on(blueprint)


class ListQuery(KeyQuery):
    """?state=&page=&pageSize= of GET /callbacks."""

    state = fields.String(
        load_default=None, validate=validate.OneOf([s.value for s in queries.CallbackState])
    )
    page = fields.Integer(load_default=0, validate=validate.Range(min=0, max=1_000_000))
    page_size = fields.Integer(
        load_default=100,
        data_key="pageSize",
        validate=validate.Range(min=1, max=queries.MAX_PAGE_SIZE),
    )


class EnableBody(Schema):
    """Body of POST /callbacks/endpoints/enable."""

    class Meta:
        unknown = RAISE

    url = Text(required=True, validate=validate.Length(min=1, max=2048))


class CallbackReply(Schema):
    """One callback with its delivery state and the payload it carries."""

    id = fields.String(required=True)
    eventType = fields.String(required=True)
    state = fields.String(
        required=True, validate=validate.OneOf([s.value for s in queries.CallbackState])
    )
    url = fields.String(required=True)
    batchUuid = fields.String(required=True, allow_none=True)
    messageUuid = fields.String(required=True, allow_none=True)
    attempts = fields.Integer(required=True)
    nextAttemptAt = IsoZ(required=True, allow_none=True)
    lastStatus = fields.Integer(required=True, allow_none=True)
    lastError = fields.String(required=True, allow_none=True)
    createdAt = IsoZ(required=True, allow_none=True)
    deliveredAt = IsoZ(required=True, allow_none=True)
    payload = fields.Raw(required=True, metadata={"type": "object"})


class CallbackPage(Page):
    """GET /callbacks: one page of callbacks."""

    callbacks = fields.List(fields.Nested(CallbackReply), required=True)


class EndpointReply(Schema):
    """One callback URL and its health."""

    url = fields.String(required=True)
    enabled = fields.Boolean(required=True)
    failingSince = IsoZ(required=True, allow_none=True)
    disabledAt = IsoZ(required=True, allow_none=True)


class EndpointList(Schema):
    """GET /callbacks/endpoints: the account's callback URLs."""

    endpoints = fields.List(fields.Nested(EndpointReply), required=True)


class Enabled(EndpointReply):
    """POST /callbacks/endpoints/enable: the endpoint as it is now, and how many held
    callbacks were released."""

    released = fields.Integer(required=True)


def callback_fields(c: Callback) -> dict[str, Any]:
    """One callback, before dumping."""
    return {
        "id": c.id,
        "eventType": c.event_type,
        "state": c.state,
        "url": c.url,
        "batchUuid": c.batch_id,
        "messageUuid": c.recipient_id,
        "attempts": c.attempts,
        "nextAttemptAt": c.next_attempt_at,
        "lastStatus": c.last_status,
        "lastError": c.last_error,
        "createdAt": c.created_at,
        "deliveredAt": c.delivered_at,
        "payload": c.payload,
    }


def endpoint_fields(e: Endpoint) -> dict[str, Any]:
    """One endpoint, before dumping."""
    return {
        "url": e.url,
        "enabled": e.disabled_at is None,
        "failingSince": e.failing_since,
        "disabledAt": e.disabled_at,
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
    return CallbackPage().dump(
        {
            "page": query["page"],
            "pageSize": query["page_size"],
            "total": total,
            "callbacks": [callback_fields(c) for c in rows],
        }
    )


@blueprint.post("/<callback_id>/retry")
def retry_callback(callback_id: str) -> dict[str, Any]:
    KeyQuery().load(request.args)
    callback = queries.retry_callback(
        session=ctx.session(),
        account_id=ctx.account().id,
        callback_id=path_ref(callback_id, what="callback"),
        now=utcnow(),
    )
    return CallbackReply().dump(callback_fields(callback))


@blueprint.get("/endpoints")
def list_endpoints() -> dict[str, Any]:
    KeyQuery().load(request.args)
    rows = queries.list_endpoints(session=ctx.session(), account_id=ctx.account().id)
    return EndpointList().dump({"endpoints": [endpoint_fields(e) for e in rows]})


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
    # Just written by enable_endpoint: the session's identity map has it, no query.
    endpoint = ctx.session().get(Endpoint, (account.id, data["url"]))
    assert endpoint is not None
    return Enabled().dump({**endpoint_fields(endpoint), "released": released})
