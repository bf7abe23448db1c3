"""Delivery report of a batch in the native dialect: ``GET /batch/<id>/report``."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, request
from marshmallow import fields, validate

from api import context as ctx
from api.dialects.mplus import replies
from api.dialects.mplus.dump import recipient_fields
from api.dialects.mplus.schemas import PageQuery
from api.errors import register_on
from api.fields import batch_ref
from dispatcher.batches import service
from dispatcher.states import RecipientStatus

blueprint = Blueprint("reports", __name__)
register_on(blueprint)


class ReportQuery(PageQuery):
    """?page=&pageSize=&status= (pages count from 0)."""

    status = fields.String(
        load_default=None, validate=validate.OneOf([s.value for s in RecipientStatus])
    )


@blueprint.get("/batch/<batch_id>/report")
def batch_report(batch_id: str) -> dict[str, Any]:
    query = ReportQuery().load(request.args)
    session = ctx.session()
    batch = service.get_batch(session=session, account=ctx.account(), batch_id=batch_ref(batch_id))
    rows, total = service.list_recipients(
        session=session,
        batch=batch,
        page=query["page"],
        page_size=query["page_size"],
        status=query["status"],
    )
    return replies.Report().dump(
        {
            "batchUuid": batch.id,
            "status": batch.status.value,
            "summary": service.status_counts(session=session, batch=batch),
            "recipients": [recipient_fields(r) for r in rows],
            "page": query["page"],
            "pageSize": query["page_size"],
            "total": total,
        }
    )
