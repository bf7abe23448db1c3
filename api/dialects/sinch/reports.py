"""Sinch delivery report views (reference: "Delivery reports") beyond a batch's own.

``GET /xms/v1/{plan}/delivery_reports`` lists recipient reports of the account's
batches; the per-batch reports live with the batches in views.py.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask import request

from api import context as ctx
from api.dialects.sinch import schemas
from api.dialects.sinch.plan import blueprint
from dispatcher.batches import reports
from dispatcher.batches.models import Batch, Recipient
from dispatcher.db import utcnow
from dispatcher.sms import parts
from dispatcher.states import RecipientStatus
from dispatcher.webhooks import sinch

_REPORTED = (RecipientStatus.DELIVERED, RecipientStatus.READ, RecipientStatus.FAILED)


def recipient_report(batch: Batch, rec: Recipient) -> dict[str, Any]:
    """A recipient's ``recipient_delivery_report_sms`` as it stands."""
    return sinch.recipient_report(
        batch=batch,
        to=rec.to,
        status=rec.status,
        error_code=rec.error_code,
        at=rec.updated_at,
        parts=rec.parts,
        encoding=str(parts.analyse(rec.body or batch.body).encoding),
        operator_status_at=rec.updated_at if rec.status in _REPORTED and rec.sent_at else None,
    )


@blueprint.get("/delivery_reports")
def list_delivery_reports() -> dict[str, Any]:
    query = schemas.ReportListQuery().load(request.args)

    def keep(row: reports.Row) -> bool:
        name, code = sinch.status_of(row.recipient.status, row.recipient.error_code)
        ref = row.batch.options.get("client_reference")
        return (
            (not query["status"] or name in query["status"])
            and (not query["code"] or code in query["code"])
            and (query["client_reference"] is None or ref == query["client_reference"])
        )

    rows, total = reports.recipient_rows(
        session=ctx.session(),
        account_id=ctx.account().id,
        start=query["start_date"] or utcnow() - timedelta(hours=24),
        end=query["end_date"],
        keep=keep,
        page=query["page"],
        page_size=query["page_size"],
    )
    return schemas.DeliveryReportPage().dump(
        schemas.page_of(
            query, total, "delivery_reports", [recipient_report(r.batch, r.recipient) for r in rows]
        )
    )
