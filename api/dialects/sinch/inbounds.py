"""Sinch inbounds: ``GET /xms/v1/{service_plan_id}/inbounds`` and ``/inbounds/{inbound_id}``.

Inbound (MO) messages in Sinch's ``mo_text`` shape, filtered as Sinch filters
them: ``to`` (comma-separated), ``start_date`` (default: 24 hours ago),
``end_date``, ``page``, ``page_size`` and ``client_reference`` (replies to a batch
that carried it).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask import Blueprint, request
from marshmallow import Schema, fields, post_load, validate

from api import context as ctx
from api.dialects.sinch.errors import register_on
from api.dialects.sinch.plan import _authorise, _plan
from api.dialects.sinch.schemas import (
    QUERY_REFERENCE_MAX,
    Paged,
    SinchPage,
    SinchTime,
    page_of,
)
from api.fields import Text, Timestamp, path_ref
from dispatcher.db import utcnow
from dispatcher.inbound import service
from dispatcher.inbound.models import InboundMessage

blueprint = Blueprint("sinch_inbounds", __name__, url_prefix="/xms/v1/<service_plan_id>/inbounds")
register_on(blueprint)
blueprint.url_value_preprocessor(_plan)
blueprint.before_request(_authorise)


class InboundQuery(Paged):
    """GET .../inbounds, loaded as list_inbounds' arguments."""

    # Numbers and short codes only, and few enough that the longest query (with a
    # client_reference in the worst percent-encoding) stays under the server's request
    # line limit, where a refusal could only come in the native shape.
    to = Text(
        load_default=None,
        validate=[
            validate.Length(max=600),
            validate.Regexp(r"^[0-9+, ]*$", error="numbers or short codes, comma-separated"),
        ],
    )
    start = Timestamp(load_default=None, data_key="start_date")
    end = Timestamp(load_default=None, data_key="end_date")
    client_reference = Text(load_default=None, validate=validate.Length(max=QUERY_REFERENCE_MAX))

    @post_load
    def _arguments(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        raw = data.pop("to")
        data["to"] = [n.strip() for n in raw.split(",") if n.strip()] if raw else []
        data["start"] = data["start"] or utcnow() - timedelta(hours=24)  # Sinch's default
        return data


class Inbound(Schema):
    type = fields.Constant("mo_text")
    id = fields.String()
    sender = fields.String(data_key="from")
    to = fields.String()
    body = fields.String()
    received_at = SinchTime()
    # Only on inbounds listed with the client_reference filter: the reference they reply to.
    client_reference = fields.String()


class InboundPage(SinchPage):
    inbounds = fields.List(fields.Nested(Inbound))


@blueprint.get("")
def list_inbounds() -> dict[str, Any]:
    query = InboundQuery().load(request.args)
    rows, total = service.list_inbounds(session=ctx.session(), account_id=ctx.account().id, **query)
    reply: dict[str, Any] = InboundPage().dump(page_of(query, total, "inbounds", rows))
    if query["client_reference"] is not None:  # what every listed inbound replies to
        for item in reply["inbounds"]:
            item["client_reference"] = query["client_reference"]
    return reply


@blueprint.get("/<inbound_id>")
def get_inbound(inbound_id: str) -> dict[str, Any]:
    row: InboundMessage = service.get_inbound(
        session=ctx.session(),
        account_id=ctx.account().id,
        inbound_id=path_ref(inbound_id, what="inbound message"),
    )
    return Inbound().dump(row)
