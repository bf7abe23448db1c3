"""Marshmallow schemas of the Sinch SMS REST API "Batches": requests and replies.

The reply schemas are what the views dump with and what /openapi.json documents,
so the document cannot drift from the wire.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_dump,
    post_load,
    pre_load,
    validate,
    validates_schema,
)

from api.fields import Lookups, NaiveUtc, Phone, Phones, Text, Timestamp, check_callback
from dispatcher.config import Settings
from dispatcher.groups.service import is_group_id
from dispatcher.webhooks.sinch import STATUSES

# A client_reference in a query string: every character may take 12 bytes once
# percent-encoded, and the whole request line must stay under the server's limit
# (8,000 bytes, api/errors.py), so filters take shorter references than bodies (2,048).
QUERY_REFERENCE_MAX = 500
DELIVERY_REPORTS = ("none", "summary", "full", "per_recipient", "per_recipient_final")
TYPES = ("mt_text", "mt_binary")
MAX_TEXT = 2000
MAX_BINARY_BYTES = 140


class SinchTime(NaiveUtc):
    """Naive UTC written as Sinch does: ``YYYY-MM-DDThh:mm:ss.SSSZ``."""

    TIMESPEC = "milliseconds"


class Strict(Schema):
    class Meta:
        unknown = RAISE


class Limited(Strict):
    """A body whose limits come from the settings (DISPATCHER_MAX_DESTINATIONS, ..._BODY_LENGTH).

    They are set on the fields, where /openapi.json reads them too.
    """

    NUMBERS: tuple[str, ...] = ()  # list-of-numbers fields, 1 to max_destinations
    TEXTS: tuple[str, ...] = ()  # bodies, at most max_body_length characters
    FEWEST = 1

    def __init__(self, *, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        # One per request: every callback host of the body shares one DNS bound.
        self.lookups = Lookups(settings.callback_resolve_timeout)
        for name in self.NUMBERS:
            self.fields[name].validators = [
                validate.Length(min=self.FEWEST, max=settings.max_destinations)
            ]
        for name in self.TEXTS:
            self.fields[name].validators = [validate.Length(max=settings.max_body_length)]


_PHONE = Phone()


class Destination(Phone):
    """A number (with or without +, returned with +) or, where Sinch allows one, a group id."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if isinstance(value, str) and is_group_id(value):
            return value
        return super()._deserialize(value, attr, data, **kwargs)


class Nullable(Schema):
    """Fields sent as null are left out: the older Sinch SDKs send null for "not set"."""

    @pre_load
    def _drop_nulls(self, data: Any, **_: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


def callback_url_field(**kwargs: Any) -> Text:
    """``callback_url`` of send, replace and update: a URL of at most 2,048 characters."""
    return Text(validate=validate.Length(max=2048), metadata={"format": "uri"}, **kwargs)


def reference_field(**kwargs: Any) -> Text:
    """``client_reference`` of send, replace and update: at most 2,048 characters."""
    return Text(validate=validate.Length(max=2048), **kwargs)


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
                    number = _PHONE.deserialize(key)
                except ValidationError as exc:
                    raise ValidationError({name: {key: exc.messages}}) from exc
                if out[name].setdefault(number, text) != text:
                    # 447700900001 and +447700900001: which value it gets is not left to chance.
                    message = f"another key names {number} with a different value"
                    raise ValidationError({name: {key: [message]}})
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


class SendSchema(Limited, Nullable):
    """Body of send (POST .../batches), replace (PUT .../batches/{id}) and dry_run.

    ``from`` may be left out: the account's default originator is used then.
    """

    NUMBERS = ("to",)
    TEXTS = ("body",)

    to = Phones(Destination(), required=True)
    sender = Text(load_default=None, data_key="from", validate=validate.Length(min=1, max=64))
    body = Text(required=True)
    type = fields.String(
        load_default="mt_text",
        validate=validate.OneOf(
            TYPES, error="must be one of {choices} (mt_media: Dispatcher has no MMS channel)"
        ),
    )
    udh = Text(load_default=None)
    delivery_report = fields.String(load_default="none", validate=validate.OneOf(DELIVERY_REPORTS))
    send_at = Timestamp(load_default=None)
    expire_at = Timestamp(load_default=None)
    callback_url = callback_url_field(load_default=None)
    client_reference = reference_field(load_default=None)
    feedback_enabled = fields.Boolean(load_default=False)
    flash_message = fields.Boolean(load_default=False)
    truncate_concat = fields.Boolean(load_default=None)
    max_number_of_message_parts = fields.Integer(
        load_default=None, validate=validate.Range(min=1, max=255)
    )
    parameters = Parameters(load_default=None)
    from_ton = fields.Integer(load_default=None, validate=validate.Range(min=0, max=6))
    from_npi = fields.Integer(load_default=None, validate=validate.Range(min=0, max=18))

    @validates_schema
    def _rules(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("callback_url") is not None:
            check_callback(
                self.settings, data["callback_url"], field="callback_url", lookups=self.lookups
            )
        if data.get("type") == "mt_binary":
            _binary(data)
        elif data.get("udh") is not None:
            raise ValidationError("is only allowed when type is mt_binary", "udh")

    @post_load
    def _unique(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        data["to"] = list(dict.fromkeys(data["to"]))
        return data


class UpdateSchema(Limited):
    """Body of update (POST .../batches/{id}); every field optional.

    The Sinch SDK always sends ``"type": "mt_text"``; older SDKs send null for a
    field they reset: null clears callback_url and client_reference, sets
    delivery_report back to none, and leaves every other field as it was.
    """

    NUMBERS = ("to_add", "to_remove")
    TEXTS = ("body",)

    type = fields.String(
        allow_none=True,
        validate=validate.OneOf(
            ("mt_text",),
            error="only mt_text batches can be updated: an mt_binary batch is sent or "
            "replaced whole, and Dispatcher has no MMS channel (mt_media)",
        ),
    )
    # The SDK's update_binary sends it: accepted here so the type's refusal is the one shown.
    udh = Text(allow_none=True, load_only=True)
    sender = Text(allow_none=True, data_key="from", validate=validate.Length(min=1, max=64))
    body = Text(allow_none=True)
    to_add = fields.List(Destination(), allow_none=True)
    to_remove = fields.List(Destination(), allow_none=True)
    delivery_report = fields.String(allow_none=True, validate=validate.OneOf(DELIVERY_REPORTS))
    send_at = Timestamp(allow_none=True)
    expire_at = Timestamp(allow_none=True)
    callback_url = callback_url_field(allow_none=True)
    client_reference = reference_field(allow_none=True)
    feedback_enabled = fields.Boolean(allow_none=True)
    parameters = Parameters(allow_none=True)
    from_ton = fields.Integer(allow_none=True, validate=validate.Range(min=0, max=6))
    from_npi = fields.Integer(allow_none=True, validate=validate.Range(min=0, max=18))
    max_number_of_message_parts = fields.Integer(
        allow_none=True, validate=validate.Range(min=1, max=255)
    )
    truncate_concat = fields.Boolean(allow_none=True)
    flash_message = fields.Boolean(allow_none=True)

    @validates_schema
    def _rules(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("callback_url") is not None:
            check_callback(
                self.settings, data["callback_url"], field="callback_url", lookups=self.lookups
            )
        if data.get("udh") is not None:
            raise ValidationError("is only allowed when type is mt_binary", "udh")

    @post_load
    def _resets(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        data.pop("type", None)
        data.pop("udh", None)
        clearable = ("callback_url", "client_reference", "delivery_report")
        out = {k: v for k, v in data.items() if v is not None or k in clearable}
        if "delivery_report" in out and out["delivery_report"] is None:
            out["delivery_report"] = "none"
        return out


class Paged(Strict):
    """``page`` (from 0) and ``page_size`` of every Sinch listing."""

    page = fields.Integer(load_default=0, validate=validate.Range(min=0, max=1_000_000))
    page_size = fields.Integer(load_default=30, validate=validate.Range(min=1, max=100))


class DryRunQuery(Strict):
    per_recipient = fields.Boolean(load_default=False)
    number_of_recipients = fields.Integer(
        load_default=100, validate=validate.Range(min=0, max=1000)
    )


class ListQuery(Paged):
    sender = fields.List(Text(), load_default=None, data_key="from")
    start_date = Timestamp(load_default=None)
    end_date = Timestamp(load_default=None)
    client_reference = Text(load_default=None, validate=validate.Length(max=QUERY_REFERENCE_MAX))

    @pre_load
    def _repeated(self, data: Any, **_: Any) -> Any:
        # Query strings arrive as a MultiDict: keep every from, not just the first.
        if hasattr(data, "getlist"):
            data = {**data.to_dict(), **({"from": data.getlist("from")} if "from" in data else {})}
        return data

    @post_load
    def _senders(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        # SDK 2.x sends from=a,b (as Sinch's reference documents); from=a&from=b works too.
        raw = data.pop("sender") or []
        data["senders"] = [s.strip() for text in raw for s in text.split(",") if s.strip()]
        return data


class CommaList(fields.String):
    """``a,b,c`` as a list of the inner field's values."""

    def __init__(self, inner: fields.Field, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inner = inner

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        text = super()._deserialize(value, attr, data, **kwargs)
        return [self.inner.deserialize(p.strip()) for p in text.split(",") if p.strip()]


class StatusName(fields.String):
    """A delivery status in any case (the SDK sends DELIVERED), as Sinch's own name."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        for name in STATUSES:
            if name.lower() == text.lower():
                return name
        raise ValidationError(f"must be one of {', '.join(STATUSES)}")


class ReportQuery(Strict):
    type = fields.String(load_default="summary", validate=validate.OneOf(("summary", "full")))
    status = CommaList(StatusName(), load_default=None)
    code = CommaList(fields.Integer(), load_default=None)
    client_reference = Text(load_default=None, validate=validate.Length(max=QUERY_REFERENCE_MAX))
    # SDK 2.3 repeats the path's batch_id in the query string; the path decides.
    batch_id = Text(load_default=None)


class ReportListQuery(Paged):
    """GET .../delivery_reports: recipient reports of the account's batches, newest first."""

    start_date = Timestamp(load_default=None)
    end_date = Timestamp(load_default=None)
    status = CommaList(StatusName(), load_default=None)
    code = CommaList(fields.Integer(), load_default=None)
    client_reference = Text(load_default=None, validate=validate.Length(max=QUERY_REFERENCE_MAX))


class RecipientPath(Strict):
    """The ``<recipient>`` of .../delivery_report/<recipient>: a number, as in every body."""

    recipient = Phone(required=True)


class FeedbackSchema(Limited):
    NUMBERS = ("recipients",)
    FEWEST = 0

    recipients = fields.List(Phone(), required=True)


# Replies -----------------------------------------------------------------------------


class Reply(Schema):
    # Sinch leaves unset optional fields out rather than sending null.
    OPTIONAL: tuple[str, ...] = ()

    @post_dump
    def _drop_unset(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        return {k: v for k, v in data.items() if v is not None or k not in self.OPTIONAL}


class SinchPage(Schema):
    """Where a page of a Sinch listing sits: its number, how many on it, how many in all."""

    page = fields.Integer(required=True)
    page_size = fields.Integer(required=True)
    count = fields.Integer(required=True)


def page_of(query: dict[str, Any], total: int, name: str, items: list[Any]) -> dict[str, Any]:
    """A page of ``items`` as Sinch lists them (``page_size`` is how many are on this one)."""
    return {"page": query["page"], "page_size": len(items), "count": total, name: items}


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


class BatchPage(SinchPage):
    """GET .../batches: a page of batches."""

    batches = fields.List(fields.Nested(BatchReply), required=True)


class DryRunRecipient(Schema):
    """One recipient of a dry run's ``per_recipient`` list: its rendered body and parts."""

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


class DeliveryReportPage(SinchPage):
    """GET .../delivery_reports: a page of recipient delivery reports."""

    delivery_reports = fields.List(fields.Nested(RecipientDeliveryReport), required=True)
