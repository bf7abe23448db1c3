"""Messaging Plus views: authenticate, parse, call one service, dump."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, request

from api import context as ctx
from api.dialects.mplus import replies, schemas
from api.dialects.mplus.dump import (
    batch_of,
    dump_batch,
    dump_dry_run,
    dump_message,
    dump_page,
    message_of,
)
from api.errors import register_on
from api.fields import batch_ref
from dispatcher.batches import service

blueprint = Blueprint("mplus", __name__)
register_on(blueprint)


@blueprint.post("/batch")
def create_batch() -> tuple[dict[str, Any], int]:
    account = ctx.account()
    query = schemas.BatchQuery().load(request.args)
    data = schemas.BatchSchema(settings=ctx.settings()).load(ctx.json_body())
    new = batch_of(data, allow_multi=query["allow_multi"])
    if query["dry_run"]:
        return dump_dry_run(service.analyse(service.fit_parts(new))), 200
    intake = service.create_batch(
        session=ctx.session(), settings=ctx.settings(), account=account, new=new
    )
    return replies.Created().dump({"identifier": intake.batch.id}), 200


@blueprint.post("/message")
def create_messages() -> tuple[dict[str, Any], int]:
    account = ctx.account()
    query = schemas.MessageQuery().load(request.args)
    entries = schemas.load_messages(settings=ctx.settings(), body=ctx.json_body())
    created = service.create_messages(
        session=ctx.session(),
        settings=ctx.settings(),
        account=account,
        messages=[message_of(entry) for entry in entries],
        dry_run=query["dry_run"],
    )
    out = [
        dump_message(entry["to_as_sent"], m, sender, batch, session=ctx.session())
        for entry, (m, sender, batch) in zip(entries, created, strict=True)
    ]
    reply = {"messages": out, "dryRun": True} if query["dry_run"] else {"messages": out}
    return replies.Messages().dump(reply), 200


@blueprint.get("/batch/<batch_id>")
def get_batch(batch_id: str) -> dict[str, Any]:
    account = ctx.account()
    schemas.KeyQuery().load(request.args)
    batch = service.get_batch(session=ctx.session(), account=account, batch_id=batch_ref(batch_id))
    return dump_batch(batch, service.status_counts(session=ctx.session(), batch=batch))


@blueprint.get("/batch/<batch_id>/messages")
def list_messages(batch_id: str) -> dict[str, Any]:
    account = ctx.account()
    query = schemas.PageQuery().load(request.args)
    batch = service.get_batch(session=ctx.session(), account=account, batch_id=batch_ref(batch_id))
    rows, total = service.list_recipients(
        session=ctx.session(),
        batch=batch,
        page=query["page"],
        page_size=query["page_size"],
        status=query["status"],
    )
    return dump_page(batch, rows, total, query)


@blueprint.delete("/batch/<batch_id>")
def cancel_batch(batch_id: str) -> dict[str, Any]:
    account = ctx.account()
    schemas.KeyQuery().load(request.args)
    batch, count = service.cancel_batch(
        session=ctx.session(),
        account=account,
        batch_id=batch_ref(batch_id),
        chunk_size=ctx.settings().chunk_size,
    )
    return replies.Cancelled().dump({"identifier": batch.id, "cancelledCount": count})
