"""Sinch batches views (Sinch SMS REST API reference, "Batches"): parse, call one service, dump.

Every route is under ``/xms/v1/{service_plan_id}/batches``; the service plan id is
the account's id, and a token used with another plan id is refused before any view.
"""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from typing import Any

from flask import Response, request

from api import context as ctx
from api.dialects.sinch import schemas
from api.dialects.sinch.dump import batch_object, dump_batch
from api.dialects.sinch.errors import CONSTRAINT, SinchError
from api.dialects.sinch.plan import blueprint, json_body
from api.dialects.sinch.reports import recipient_report
from api.fields import batch_ref
from dispatcher import errors
from dispatcher.batches import queries, service, updates
from dispatcher.batches.service import NewBatch
from dispatcher.channels import registry
from dispatcher.db import utcnow
from dispatcher.groups import service as groups
from dispatcher.sms import parts
from dispatcher.states import OPEN_BATCH
from dispatcher.webhooks import sinch

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


def _sendable(data: dict[str, Any]) -> dict[str, Any]:
    """Refuse what no provider here can carry, rather than send it wrongly."""
    if data["type"] == "mt_binary" and not registry.carries_binary(ctx.settings(), "sms"):
        # Only smpp sends 8-bit data with its UDH; the others would send the base64
        # text and lose the udh. Dry runs still analyse it.
        raise SinchError(
            400,
            CONSTRAINT,
            "type: mt_binary cannot be sent: the sms provider here carries text only "
            "(binary SMS needs the smpp provider); send mt_text, or use dry_run to check it",
        )
    return data


def _new_batch(data: dict[str, Any]) -> NewBatch:
    """A loaded SendSchema as the core's NewBatch, with the service plan's defaults."""
    account = ctx.account()
    sender = data["sender"] or account.default_originator
    if sender is None:
        raise SinchError(
            400,
            CONSTRAINT,
            "from: is required (the service plan has no default originator)",
        )
    to = groups.expand(
        session=ctx.session(),
        account_id=account.id,
        entries=data["to"],
        most=ctx.settings().max_destinations,
    )
    if not to:
        raise SinchError(400, CONSTRAINT, "to: the groups named have no members")
    times = updates.window(send_at=data["send_at"], expire_at=data["expire_at"], now=utcnow())
    options = {name: data[name] for name in OPTIONS}
    options["default_expiry"] = times.default_expiry
    fitted = updates.fit_recipients(
        body=data["body"],
        destinations=to,
        options=options,
        max_length=ctx.settings().max_body_length,
    )
    return NewBatch(
        sender=sender,
        body=fitted.body,
        destinations=to,
        channels=["sms"],
        callback_url=data["callback_url"] or account.default_callback_url,
        send_at=times.send_at,
        expire_at=times.expire_at,
        dialect="sinch",
        options=options,
        bodies=fitted.bodies,
        rejected=fitted.rejected or None,
    )


def _reply(batch: Any) -> dict[str, Any]:
    to = queries.destinations_of(session=ctx.session(), batch_ids=[batch.id])[batch.id]
    return dump_batch(batch, to)


@blueprint.post("/batches")
def send() -> tuple[dict[str, Any], int]:
    data = _sendable(schemas.SendSchema(settings=ctx.settings()).load(json_body()))
    intake = service.create_batch(
        session=ctx.session(), settings=ctx.settings(), account=ctx.account(), new=_new_batch(data)
    )
    return _reply(intake.batch), 201


@blueprint.get("/batches")
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
        schemas.page_of(query, total, "batches", [batch_object(b, to[b.id]) for b in rows])
    )


@blueprint.post("/batches/dry_run")
def dry_run() -> dict[str, Any]:
    query = schemas.DryRunQuery().load(request.args)
    data = schemas.SendSchema(settings=ctx.settings()).load(json_body())
    new = _new_batch(data)
    bodies = list(new.bodies or [new.body] * len(new.destinations))
    if data["type"] == "mt_binary":
        n = parts.binary_parts(data["body"], udh=data["udh"])
        per = [(to, body, n, "BINARY") for to, body in zip(new.destinations, bodies, strict=True)]
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


@blueprint.get("/batches/<batch_id>")
def get_batch(batch_id: str) -> dict[str, Any]:
    return _reply(
        service.get_batch(
            session=ctx.session(), account=ctx.account(), batch_id=batch_ref(batch_id)
        )
    )


# Update fields that live in Batch.options rather than in a column.
_UPDATE_OPTIONS = (
    "delivery_report",
    "client_reference",
    "feedback_enabled",
    "parameters",
    "from_ton",
    "from_npi",
    "max_number_of_message_parts",
    "truncate_concat",
    "flash_message",
)


def _changes(data: dict[str, Any]) -> dict[str, Any]:
    """A loaded UpdateSchema as update_batch's fields; a cleared callback_url falls back
    to the service plan's, as on send."""
    fields: dict[str, Any] = {
        k: data[k] for k in ("sender", "body", "send_at", "expire_at") if k in data
    }
    if "callback_url" in data:
        fields["callback_url"] = data["callback_url"] or ctx.account().default_callback_url
    fields["options"] = {k: data[k] for k in _UPDATE_OPTIONS if k in data}
    return fields


def _unstarted(batch_id: str) -> dict[str, Any]:
    """The calling account's batch ``batch_id``, as the services that change one take it."""
    return {
        "session": ctx.session(),
        "settings": ctx.settings(),
        "account": ctx.account(),
        "batch_id": batch_ref(batch_id),
    }


@blueprint.post("/batches/<batch_id>")
def update_batch(batch_id: str) -> dict[str, Any]:
    data = schemas.UpdateSchema(settings=ctx.settings()).load(json_body())
    expand = partial(groups.expand, session=ctx.session(), account_id=ctx.account().id)
    batch = updates.update_batch(
        **_unstarted(batch_id),
        fields=_changes(data),
        # More than a batch may hold can only be refused: no need to read every group.
        to_add=expand(
            entries=data.get("to_add", ()), most=ctx.settings().max_destinations, field="to_add"
        ),
        to_remove=expand(entries=data.get("to_remove", ())),
    )
    return _reply(batch)


@blueprint.put("/batches/<batch_id>")
def replace_batch(batch_id: str) -> dict[str, Any]:
    data = _sendable(schemas.SendSchema(settings=ctx.settings()).load(json_body()))
    batch = updates.replace_batch(
        **_unstarted(batch_id),
        new=_new_batch(data),
    )
    return _reply(batch)


@blueprint.delete("/batches/<batch_id>")
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


@blueprint.post("/batches/<batch_id>/delivery_feedback")
def delivery_feedback(batch_id: str) -> Response:
    data = schemas.FeedbackSchema(settings=ctx.settings()).load(json_body())
    updates.record_feedback(
        session=ctx.session(),
        account=ctx.account(),
        batch_id=batch_ref(batch_id),
        recipients=data["recipients"],
    )
    return Response(status=202)


@blueprint.get("/batches/<batch_id>/delivery_report")
def delivery_report(batch_id: str) -> dict[str, Any]:
    query = schemas.ReportQuery().load(request.args)
    batch = service.get_batch(
        session=ctx.session(), account=ctx.account(), batch_id=batch_ref(batch_id)
    )
    wanted = query["client_reference"]
    if wanted is not None and batch.options.get("client_reference") != wanted:
        raise errors.NotFound(f"batch {batch.id} has no client_reference {wanted!r}")
    report = sinch.summary(
        batch=batch,
        outcomes=sinch.outcomes_of(ctx.session(), batch.id),
        full=query["type"] == "full",
        statuses=query["status"],
        codes=query["code"],
    )
    return schemas.DeliveryReport().dump(report)


@blueprint.get("/batches/<batch_id>/delivery_report/<recipient>")
def recipient_delivery_report(batch_id: str, recipient: str) -> dict[str, Any]:
    to = schemas.RecipientPath().load({"recipient": recipient})["recipient"]
    batch = service.get_batch(
        session=ctx.session(), account=ctx.account(), batch_id=batch_ref(batch_id)
    )
    rec = queries.get_recipient(session=ctx.session(), batch=batch, to=to)
    return schemas.RecipientDeliveryReport().dump(recipient_report(batch, rec))
