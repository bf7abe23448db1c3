"""Sinch batches views (Sinch SMS REST API reference, "Batches"): parse, call one service, dump.

Every route is under ``/xms/v1/{service_plan_id}/batches``; the service plan id is
the account's id, and a token used with another plan id is refused before any view.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask import Blueprint, Response, g, request

from api import context as ctx
from api.dialects.sinch import schemas
from api.dialects.sinch.dump import batch_object, dump_batch
from api.dialects.sinch.errors import INVALID_JSON, SinchError, register_on
from api.fields import batch_ref
from dispatcher import errors
from dispatcher.batches import queries, service, updates
from dispatcher.batches.service import NewBatch
from dispatcher.db import utcnow
from dispatcher.sms import parts
from dispatcher.states import OPEN_BATCH, RecipientStatus
from dispatcher.webhooks import sinch

blueprint = Blueprint("sinch", __name__, url_prefix="/xms/v1/<service_plan_id>/batches")
register_on(blueprint)

# Batch fields kept in Batch.options.
OPTIONS = (
    "type",
    "udh",
    "delivery_report",
    "client_reference",
    "feedback_enabled",
    "flash_message",
    "truncate_concat",
    "max_number_of_message_parts",
    "parameters",
    "from_ton",
    "from_npi",
)


@blueprint.url_value_preprocessor
def _plan(_endpoint: str | None, values: dict[str, Any] | None) -> None:
    g.service_plan_id = (values or {}).pop("service_plan_id", None)


@blueprint.before_request
def _authorise() -> None:
    account = ctx.account()
    if g.service_plan_id != account.id:
        raise SinchError(
            403, "forbidden", f"the API token is not valid for service plan {g.service_plan_id}"
        )


def _json() -> Any:
    """The parsed body (any Content-Type, as Sinch takes it); broken JSON is syntax_invalid_json."""
    try:
        return ctx.json_body()
    except errors.ValidationError as exc:
        raise SinchError(400, INVALID_JSON, exc.message) from exc


def _new_batch(data: dict[str, Any]) -> NewBatch:
    """A loaded SendSchema as the core's NewBatch."""
    times = updates.window(send_at=data["send_at"], expire_at=data["expire_at"], now=utcnow())
    binary = data["type"] == "mt_binary"
    options = {name: data[name] for name in OPTIONS}
    options["default_expiry"] = times.default_expiry
    limit = ctx.settings().max_body_length
    bodies = (
        None
        if binary
        else updates.render(data["body"], data["to"], data["parameters"], max_length=limit)
    )
    return NewBatch(
        sender=data["sender"],
        body=data["body"],
        destinations=data["to"],
        channels=["sms"],
        callback_url=data["callback_url"],
        send_at=times.send_at,
        expire_at=times.expire_at,
        dialect="sinch",
        options=options,
        bodies=bodies,
        max_parts=None if binary else data["max_number_of_message_parts"],
        truncate=bool(data["truncate_concat"]),
    )


def _reply(batch: Any) -> dict[str, Any]:
    to = queries.destinations_of(session=ctx.session(), batch_ids=[batch.id])[batch.id]
    return dump_batch(batch, to)


@blueprint.post("")
def send() -> tuple[dict[str, Any], int]:
    data = schemas.SendSchema(settings=ctx.settings()).load(_json())
    intake = service.create_batch(
        session=ctx.session(), settings=ctx.settings(), account=ctx.account(), new=_new_batch(data)
    )
    return _reply(intake.batch), 201


@blueprint.get("")
def list_batches() -> dict[str, Any]:
    query = schemas.ListQuery().load(request.args)
    rows, total = queries.list_batches(
        session=ctx.session(),
        account=ctx.account(),
        page=query["page"],
        page_size=query["page_size"],
        senders=query["senders"],
        start=query["start_date"] or utcnow() - timedelta(hours=24),
        end=query["end_date"],
        client_reference=query["client_reference"],
    )
    to = queries.destinations_of(session=ctx.session(), batch_ids=[b.id for b in rows])
    return schemas.BatchPage().dump(
        {
            "page": query["page"],
            "page_size": len(rows),
            "count": total,
            "batches": [batch_object(b, to[b.id]) for b in rows],
        }
    )


@blueprint.post("/dry_run")
def dry_run() -> dict[str, Any]:
    query = schemas.DryRunQuery().load(request.args)
    data = schemas.SendSchema(settings=ctx.settings()).load(_json())
    new = service.fit_parts(_new_batch(data))
    bodies = list(new.bodies or [new.body] * len(new.destinations))
    if data["type"] == "mt_binary":
        per = [(to, body, 1, "BINARY") for to, body in zip(new.destinations, bodies, strict=True)]
    else:
        report = service.analyse(new)
        per = [(to, body, i.parts, str(i.encoding)) for to, body, i in report.per_recipient]
    reply: dict[str, Any] = {
        "number_of_recipients": len(per),
        "number_of_messages": sum(p[2] for p in per),
    }
    if query["per_recipient"]:
        reply["per_recipient"] = [
            {"recipient": to, "number_of_parts": n, "body": body, "encoding": enc}
            for to, body, n, enc in per[: query["number_of_recipients"]]
        ]
    return schemas.DryRunReply().dump(reply)


@blueprint.get("/<batch_id>")
def get_batch(batch_id: str) -> dict[str, Any]:
    return _reply(
        service.get_batch(
            session=ctx.session(), account=ctx.account(), batch_id=batch_ref(batch_id)
        )
    )


@blueprint.post("/<batch_id>")
def update_batch(batch_id: str) -> dict[str, Any]:
    data = schemas.UpdateSchema(settings=ctx.settings()).load(_json())
    fields = {
        k: data[k] for k in ("sender", "body", "send_at", "expire_at", "callback_url") if k in data
    }
    if "delivery_report" in data:
        fields["options"] = {"delivery_report": data["delivery_report"]}
    batch = updates.update_batch(
        session=ctx.session(),
        settings=ctx.settings(),
        account=ctx.account(),
        batch_id=batch_ref(batch_id),
        fields=fields,
        to_add=data.get("to_add", ()),
        to_remove=data.get("to_remove", ()),
    )
    return _reply(batch)


@blueprint.put("/<batch_id>")
def replace_batch(batch_id: str) -> dict[str, Any]:
    data = schemas.SendSchema(settings=ctx.settings()).load(_json())
    batch = updates.replace_batch(
        session=ctx.session(),
        settings=ctx.settings(),
        account=ctx.account(),
        batch_id=batch_ref(batch_id),
        new=_new_batch(data),
    )
    return _reply(batch)


@blueprint.delete("/<batch_id>")
def cancel_batch(batch_id: str) -> dict[str, Any]:
    batch = service.get_batch(
        session=ctx.session(), account=ctx.account(), batch_id=batch_ref(batch_id)
    )
    # A batch that already ended is returned unchanged, as Sinch does.
    if batch.status in OPEN_BATCH:
        batch, _count = service.cancel_batch(
            session=ctx.session(), account=ctx.account(), batch_id=batch.id
        )
    return _reply(batch)


@blueprint.post("/<batch_id>/delivery_feedback")
def delivery_feedback(batch_id: str) -> Response:
    data = schemas.FeedbackSchema().load(_json())
    updates.record_feedback(
        session=ctx.session(),
        account=ctx.account(),
        batch_id=batch_ref(batch_id),
        recipients=data["recipients"],
    )
    return Response(status=202)


@blueprint.get("/<batch_id>/delivery_report")
def delivery_report(batch_id: str) -> dict[str, Any]:
    query = schemas.ReportQuery().load(request.args)
    batch = service.get_batch(
        session=ctx.session(), account=ctx.account(), batch_id=batch_ref(batch_id)
    )
    report = sinch.summary(
        batch=batch,
        outcomes=sinch.outcomes_of(ctx.session(), batch.id),
        full=query["type"] == "full",
        statuses=query["status"],
        codes=query["code"],
    )
    return schemas.DeliveryReport().dump(report)


@blueprint.get("/<batch_id>/delivery_report/<recipient>")
def recipient_delivery_report(batch_id: str, recipient: str) -> dict[str, Any]:
    to = schemas.RecipientPath().load({"recipient": recipient})["recipient"]
    batch = service.get_batch(
        session=ctx.session(), account=ctx.account(), batch_id=batch_ref(batch_id)
    )
    rec = queries.get_recipient(session=ctx.session(), batch=batch, to=to)
    reported = rec.status in (
        RecipientStatus.DELIVERED,
        RecipientStatus.READ,
        RecipientStatus.FAILED,
    )
    report = sinch.recipient_report(
        batch=batch,
        to=rec.to,
        status=rec.status,
        error_code=rec.error_code,
        at=rec.updated_at,
        parts=rec.parts,
        encoding=str(parts.analyse(rec.body or batch.body).encoding),
        operator_status_at=rec.updated_at if reported and rec.sent_at else None,
    )
    return schemas.RecipientDeliveryReport().dump(report)
