"""Messaging Plus views: parse, call one service, dump."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, request
from marshmallow import ValidationError

from api import context as ctx
from api.dialects.mplus import schemas
from api.dialects.mplus.dump import dump_batch, dump_recipient
from api.errors import register_on
from dispatcher.batches import service
from dispatcher.states import RecipientStatus

blueprint = Blueprint("mplus", __name__)
register_on(blueprint)


@blueprint.post("/batch")
def create_batch() -> tuple[dict[str, Any], int]:
    query = schemas.BatchQuery().load(request.args)
    account = ctx.account()
    data = schemas.BatchSchema(settings=ctx.settings()).load(ctx.json_body())
    new = service.NewBatch(
        sender=data["sender"],
        body=data["message"],
        destinations=data["destinations"],
        channels=data["channels"],
        callback_url=data["callback"],
        send_at=data["send_at"],
        client_id=data["id"],
        max_parts=None if query["allow_multi"] else 1,
    )
    if query["dry_run"]:
        report = service.analyse(service.fit_parts(new))
        return {
            "identifier": None,
            "dryRun": True,
            "recipients": report.recipients,
            "parts": report.parts,
            "encoding": report.encoding,
        }, 200
    intake = service.create_batch(
        session=ctx.session(), settings=ctx.settings(), account=account, new=new
    )
    return {"identifier": intake.batch.id}, 200


@blueprint.post("/message")
def create_messages() -> tuple[dict[str, Any], int]:
    query = schemas.BatchQuery().load(request.args)
    account = ctx.account()
    envelope = schemas.MessagesEnvelope().load(ctx.json_body())
    settings = ctx.settings()
    if not 1 <= len(envelope["messages"]) <= settings.max_destinations:
        raise ValidationError(f"must hold 1 to {settings.max_destinations} messages", "messages")
    schema = schemas.MessageSchema(settings=settings)
    errors, parsed = {}, []
    for i, raw in enumerate(envelope["messages"]):
        try:
            parsed.append(schema.load({**envelope["defaults"], **raw}))
        except ValidationError as exc:
            errors[i] = exc.messages
    if errors:
        raise ValidationError({"messages": errors})
    messages = [
        service.NewMessage(
            to=m["to"],
            body=m["body"],
            sender=m["sender"].get("value"),
            shared_sender=m["sender"]["type"] == "shared",
            channels=m["channels"],
            callback_url=m["callback"],
            send_at=m["send_at"],
            client_id=m["id"],
        )
        for m in parsed
    ]
    created = service.create_messages(
        session=ctx.session(),
        settings=settings,
        account=account,
        messages=messages,
        dry_run=query["dry_run"],
    )
    out = []
    for m, sender, batch in created:
        item: dict[str, Any] = {
            "to": m.to,
            "body": m.body,
            "from": {"type": "shared" if m.shared_sender else "custom", "value": sender},
            "batchUuid": batch.id if batch else None,
            "messageUuid": None,
            "scheduled": m.send_at is not None,
        }
        if batch is not None:
            item["messageUuid"] = service.first_recipient_id(session=ctx.session(), batch=batch)
        out.append(item)
    body: dict[str, Any] = {"messages": out}
    if query["dry_run"]:
        body["dryRun"] = True
    return body, 200


@blueprint.get("/batch/<batch_id>")
def get_batch(batch_id: str) -> dict[str, Any]:
    schemas.PageQuery(only=("key",)).load(request.args)
    batch = service.get_batch(session=ctx.session(), account=ctx.account(), batch_id=batch_id)
    return dump_batch(batch, service.status_counts(session=ctx.session(), batch=batch))


@blueprint.get("/batch/<batch_id>/messages")
def list_messages(batch_id: str) -> dict[str, Any]:
    query = schemas.PageQuery().load(request.args)
    if query["status"] is not None and query["status"] not in set(RecipientStatus):
        raise ValidationError(f"must be one of {', '.join(RecipientStatus)}", "status")
    batch = service.get_batch(session=ctx.session(), account=ctx.account(), batch_id=batch_id)
    rows, total = service.list_recipients(
        session=ctx.session(),
        batch=batch,
        page=query["page"],
        page_size=query["page_size"],
        status=query["status"],
    )
    return {
        "batchUuid": batch.id,
        "page": query["page"],
        "pageSize": query["page_size"],
        "total": total,
        "messages": [dump_recipient(r) for r in rows],
    }


@blueprint.delete("/batch/<batch_id>")
def cancel_batch(batch_id: str) -> dict[str, Any]:
    schemas.PageQuery(only=("key",)).load(request.args)
    batch, count = service.cancel_batch(
        session=ctx.session(), account=ctx.account(), batch_id=batch_id
    )
    return {"identifier": batch.id, "cancelledCount": count}
