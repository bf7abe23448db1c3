"""Reply schemas of the native dialect: the views dump through them, /openapi.json shows them."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, fields, validate

from api.fields import NaiveUtc
from dispatcher.states import BatchStatus, RecipientStatus

RECIPIENT_STATUSES = [s.value for s in RecipientStatus]


# Naive UTC as ISO 8601 seconds with ``Z``.
IsoZ = NaiveUtc


def _maybe(field: type[fields.Field], **kwargs: Any) -> fields.Field:
    return field(required=True, allow_none=True, **kwargs)


class Created(Schema):
    """POST /batch: the batch's identifier."""

    identifier = fields.String(required=True)


class DryRun(Schema):
    """POST /batch?dryRun=true: what would have been sent."""

    identifier = fields.Constant(None, required=True, allow_none=True)
    dryRun = fields.Boolean(required=True)
    recipients = fields.Integer(required=True)
    parts = fields.Integer(required=True)
    encoding = fields.String(required=True)


class Error(Schema):
    code = fields.String(required=True)
    text = _maybe(fields.String)


class Batch(Schema):
    """GET /batch/{id}: a batch with its recipient counts per state."""

    identifier = fields.String(required=True)
    id = _maybe(fields.String)
    status = fields.String(required=True, validate=validate.OneOf([s.value for s in BatchStatus]))
    sender = fields.String(required=True, data_key="from")
    message = fields.String(required=True)
    channels = fields.List(fields.String(), required=True)
    callback = _maybe(fields.String)
    sendAt = _maybe(IsoZ)
    expireAt = _maybe(IsoZ)
    createdAt = _maybe(IsoZ)
    completedAt = _maybe(IsoZ)
    recipients = fields.Integer(required=True)
    counts = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)


class Recipient(Schema):
    """One recipient's status."""

    messageUuid = fields.String(required=True)
    to = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(RECIPIENT_STATUSES))
    channel = _maybe(fields.String)
    attempts = fields.Integer(required=True)
    parts = _maybe(fields.Integer)
    providerMessageId = _maybe(fields.String)
    error = _maybe(fields.Nested, nested=Error)
    sentAt = _maybe(IsoZ)
    updatedAt = _maybe(IsoZ)
    id = _maybe(fields.String)


class Page(Schema):
    """Where a page of a native listing sits (pages count from 0) and how many rows in all."""

    page = fields.Integer(required=True)
    pageSize = fields.Integer(required=True)
    total = fields.Integer(required=True)


class MessagesPage(Schema):
    """GET /batch/{id}/messages: one page of recipients (keys in this order on the wire)."""

    batchUuid = fields.String(required=True)
    page = fields.Integer(required=True)
    pageSize = fields.Integer(required=True)
    total = fields.Integer(required=True)
    messages = fields.List(fields.Nested(Recipient), required=True)


class Cancelled(Schema):
    """DELETE /batch/{id}: how many recipients were cancelled."""

    identifier = fields.String(required=True)
    cancelledCount = fields.Integer(required=True)


class Sender(Schema):
    type = fields.String(required=True, validate=validate.OneOf(["custom", "shared"]))
    value = fields.String(required=True)


class Message(Schema):
    """One entry of the POST /message reply (``to`` as sent)."""

    to = fields.String(required=True)
    body = fields.String(required=True)
    sender = fields.Nested(Sender, required=True, data_key="from")
    batchUuid = _maybe(fields.String)
    messageUuid = _maybe(fields.String)
    scheduled = fields.Boolean(required=True)


class Messages(Schema):
    """POST /message: one entry per message (``dryRun`` only on a dry run)."""

    messages = fields.List(fields.Nested(Message), required=True)
    dryRun = fields.Boolean()


class ReportRow(Schema):
    """One recipient as GET /batch/{id}/report lists it."""

    messageUuid = fields.String(required=True)
    to = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(RECIPIENT_STATUSES))
    channel = _maybe(fields.String)
    error = _maybe(fields.Nested, nested=Error)
    updatedAt = _maybe(IsoZ)
    id = _maybe(fields.String)


class Report(Schema):
    """GET /batch/{id}/report: the batch's status, counts and one page of recipients."""

    batchUuid = fields.String(required=True)
    status = fields.String(required=True)
    summary = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)
    recipients = fields.List(fields.Nested(ReportRow), required=True)
    page = fields.Integer(required=True)
    pageSize = fields.Integer(required=True)
    total = fields.Integer(required=True)
