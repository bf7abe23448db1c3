"""Marshmallow schemas of the Sinch SMS REST API "Batches": requests and replies.

The reply schemas are what the views dump with and what /openapi.json documents,
so the document cannot drift from the wire.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any

from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_dump,
    post_load,
    validate,
    validates_schema,
)

from api.fields import Phone, Text, Timestamp, check_callback
from dispatcher.config import Settings
from dispatcher.webhooks.sinch import STATUSES

DELIVERY_REPORTS = ("none", "summary", "full", "per_recipient", "per_recipient_final")
TYPES = ("mt_text", "mt_binary")
MAX_TEXT = 2000
MAX_BINARY_BYTES = 140


class SinchTime(fields.DateTime):
    """Naive UTC written as Sinch does: ``YYYY-MM-DDThh:mm:ss.SSSZ``."""

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.isoformat(timespec="milliseconds") + "Z"


class Strict(Schema):
    class Meta:
        unknown = RAISE


_PHONE = Phone()


class Parameters(fields.Dict):
    """``{"name": {"<msisdn>": "value", "default": "value"}}``; msisdn keys normalised to E.164."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            keys=Text(validate=validate.Length(min=1, max=64)),
            values=fields.Dict(keys=Text(), values=Text(validate=validate.Length(max=MAX_TEXT))),
            **kwargs,
        )

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        loaded = super()._deserialize(value, attr, data, **kwargs)
        out: dict[str, dict[str, str]] = {}
        for name, mapping in loaded.items():
            out[name] = {}
            for key, text in mapping.items():
                if key == "default":
                    out[name][key] = text
                    continue
                # Phone: the same ASCII-digits rule as every other number field.
                try:
                    out[name][_PHONE.deserialize(key)] = text
                except ValidationError as exc:
                    raise ValidationError({name: {key: exc.messages}}) from exc
        return out


def _binary(data: dict[str, Any]) -> None:
    """mt_binary: base64 body and hex udh, 140 bytes together at most."""
    if data.get("udh") is None:
        raise ValidationError("is required when type is mt_binary", "udh")
    if data.get("parameters"):
        raise ValidationError("are not applicable to mt_binary", "parameters")
    try:
        body = base64.b64decode(data.get("body", ""), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValidationError("must be base64 for mt_binary", "body") from exc
    try:
        udh = bytes.fromhex(data["udh"])
    except ValueError as exc:
        raise ValidationError("must be hex digits", "udh") from exc
    if len(body) + len(udh) > MAX_BINARY_BYTES:
        raise ValidationError(
            f"body and udh are {len(body) + len(udh)} bytes; at most {MAX_BINARY_BYTES}", "body"
        )


class SendSchema(Strict):
    """Body of send (POST .../batches), replace (PUT .../batches/{id}) and dry_run."""

    to = fields.List(Phone(), required=True, validate=validate.Length(min=1, max=1000))
    sender = Text(required=True, data_key="from", validate=validate.Length(min=1, max=64))
    body = Text(required=True, validate=validate.Length(max=MAX_TEXT))
    type = fields.String(load_default="mt_text", validate=validate.OneOf(TYPES))
    udh = Text(load_default=None)
    delivery_report = fields.String(load_default="none", validate=validate.OneOf(DELIVERY_REPORTS))
    send_at = Timestamp(load_default=None)
    expire_at = Timestamp(load_default=None)
    callback_url = Text(load_default=None, validate=validate.Length(max=2048))
    client_reference = Text(load_default=None, validate=validate.Length(max=2048))
    feedback_enabled = fields.Boolean(load_default=False)
    flash_message = fields.Boolean(load_default=False)
    truncate_concat = fields.Boolean(load_default=None)
    max_number_of_message_parts = fields.Integer(
        load_default=None, validate=validate.Range(min=1, max=255)
    )
    parameters = Parameters(load_default=None)
    from_ton = fields.Integer(load_default=None, validate=validate.Range(min=0, max=6))
    from_npi = fields.Integer(load_default=None, validate=validate.Range(min=0, max=18))

    def __init__(self, *, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings

    @validates_schema
    def _rules(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("callback_url") is not None:
            check_callback(self.settings, data["callback_url"], field="callback_url")
        if data.get("type") == "mt_binary":
            _binary(data)
        elif data.get("udh") is not None:
            raise ValidationError("is only allowed when type is mt_binary", "udh")

    @post_load
    def _unique(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        data["to"] = list(dict.fromkeys(data["to"]))
        return data


class UpdateSchema(Strict):
    """Body of update (POST .../batches/{id}); every field optional."""

    sender = Text(data_key="from", validate=validate.Length(min=1, max=64))
    body = Text(validate=validate.Length(max=MAX_TEXT))
    to_add = fields.List(Phone(), validate=validate.Length(min=1, max=1000))
    to_remove = fields.List(Phone(), validate=validate.Length(min=1, max=1000))
    delivery_report = fields.String(validate=validate.OneOf(DELIVERY_REPORTS))
    send_at = Timestamp()
    expire_at = Timestamp()
    callback_url = Text(validate=validate.Length(max=2048))

    def __init__(self, *, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings

    @validates_schema
    def _rules(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("callback_url") is not None:
            check_callback(self.settings, data["callback_url"], field="callback_url")


class DryRunQuery(Strict):
    per_recipient = fields.Boolean(load_default=False)
    number_of_recipients = fields.Integer(
        load_default=100, validate=validate.Range(min=0, max=1000)
    )


class ListQuery(Strict):
    page = fields.Integer(load_default=0, validate=validate.Range(min=0, max=1_000_000))
    page_size = fields.Integer(load_default=30, validate=validate.Range(min=1, max=100))
    sender = Text(load_default=None, data_key="from")
    start_date = Timestamp(load_default=None)
    end_date = Timestamp(load_default=None)
    client_reference = Text(load_default=None, validate=validate.Length(max=2048))

    @post_load
    def _senders(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        raw = data.pop("sender")
        data["senders"] = [s.strip() for s in raw.split(",") if s.strip()] if raw else []
        return data


class CommaList(fields.String):
    """``a,b,c`` as a list of the inner field's values."""

    def __init__(self, inner: fields.Field, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inner = inner

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        text = super()._deserialize(value, attr, data, **kwargs)
        return [self.inner.deserialize(p.strip()) for p in text.split(",") if p.strip()]


class ReportQuery(Strict):
    type = fields.String(load_default="summary", validate=validate.OneOf(("summary", "full")))
    status = CommaList(fields.String(validate=validate.OneOf(STATUSES)), load_default=None)
    code = CommaList(fields.Integer(), load_default=None)


class RecipientPath(Strict):
    """The ``<recipient>`` of .../delivery_report/<recipient>: a number, as in every body."""

    recipient = Phone(required=True)


class FeedbackSchema(Strict):
    recipients = fields.List(Phone(), required=True, validate=validate.Length(max=1000))


# Replies -----------------------------------------------------------------------------


class Reply(Schema):
    # Sinch leaves unset optional fields out rather than sending null.
    OPTIONAL: tuple[str, ...] = ()

    @post_dump
    def _drop_unset(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        return {k: v for k, v in data.items() if v is not None or k not in self.OPTIONAL}


class BatchReply(Reply):
    """A batch as send, get, update, replace, cancel and list return it."""

    OPTIONAL = (
        "udh",
        "parameters",
        "callback_url",
        "client_reference",
        "truncate_concat",
        "max_number_of_message_parts",
        "from_ton",
        "from_npi",
    )

    id = fields.String(required=True)
    to = fields.List(fields.String(), required=True)
    sender = fields.String(data_key="from", required=True)
    canceled = fields.Boolean(required=True)
    parameters = fields.Dict(keys=fields.String(), values=fields.Dict())
    body = fields.String(required=True)
    type = fields.String(required=True, validate=validate.OneOf(TYPES))
    udh = fields.String()
    created_at = SinchTime(required=True)
    modified_at = SinchTime(required=True)
    delivery_report = fields.String(required=True, validate=validate.OneOf(DELIVERY_REPORTS))
    send_at = SinchTime(required=True)
    expire_at = SinchTime(required=True)
    callback_url = fields.String()
    client_reference = fields.String()
    feedback_enabled = fields.Boolean(required=True)
    flash_message = fields.Boolean(required=True)
    truncate_concat = fields.Boolean()
    max_number_of_message_parts = fields.Integer()
    from_ton = fields.Integer()
    from_npi = fields.Integer()


class BatchPage(Schema):
    page = fields.Integer(required=True)
    page_size = fields.Integer(required=True)
    count = fields.Integer(required=True)
    batches = fields.List(fields.Nested(BatchReply), required=True)


class DryRunRecipient(Schema):
    recipient = fields.String(required=True)
    number_of_parts = fields.Integer(required=True)
    body = fields.String(required=True)
    encoding = fields.String(required=True, validate=validate.OneOf(("GSM", "UNICODE", "BINARY")))


class DryRunReply(Reply):
    OPTIONAL = ("per_recipient",)

    number_of_recipients = fields.Integer(required=True)
    number_of_messages = fields.Integer(required=True)
    per_recipient = fields.List(fields.Nested(DryRunRecipient))


class StatusCount(Reply):
    OPTIONAL = ("recipients",)

    code = fields.Integer(required=True)
    status = fields.String(required=True, validate=validate.OneOf(STATUSES))
    count = fields.Integer(required=True)
    recipients = fields.List(fields.String())


class DeliveryReport(Reply):
    OPTIONAL = ("client_reference",)

    type = fields.String(required=True, validate=validate.Equal("delivery_report_sms"))
    batch_id = fields.String(required=True)
    total_message_count = fields.Integer(required=True)
    statuses = fields.List(fields.Nested(StatusCount), required=True)
    client_reference = fields.String()


class RecipientDeliveryReport(Reply):
    OPTIONAL = ("client_reference", "operator_status_at", "encoding", "number_of_message_parts")

    type = fields.String(required=True, validate=validate.Equal("recipient_delivery_report_sms"))
    batch_id = fields.String(required=True)
    recipient = fields.String(required=True)
    code = fields.Integer(required=True)
    status = fields.String(required=True, validate=validate.OneOf(STATUSES))
    at = fields.String(required=True)
    operator_status_at = fields.String()
    applied_originator = fields.String()
    client_reference = fields.String()
    number_of_message_parts = fields.Integer()
    encoding = fields.String()


class ErrorReply(Schema):
    code = fields.String(required=True)
    text = fields.String(required=True)
