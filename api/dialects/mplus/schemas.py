"""Marshmallow schemas of the Messaging Plus dialect ("Add Batch", "Add Message").

Where the vendor's pages spell a field two ways (``id``/``uuid``, ``send_at``/``at``,
``isDryrun``/``dryRun``) both are accepted; giving both with different values is an error.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_load,
    pre_load,
    validate,
    validates_schema,
)

from api.fields import (
    NOT_BLANK,
    ClientUuid,
    Lookups,
    Phone,
    Phones,
    Text,
    Timestamp,
    check_callback,
)
from dispatcher.config import Settings
from dispatcher.db import utcnow
from dispatcher.states import RecipientStatus

SENDER = [validate.Length(min=1, max=64), NOT_BLANK]
URL = validate.Length(min=1, max=2048)


class SettingsSchema(Schema):
    """A schema that validates against the settings in force."""

    class Meta:
        unknown = RAISE

    def __init__(self, *, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        # One per request: every callback host of the body shares one DNS bound.
        self.lookups = Lookups(settings.callback_resolve_timeout)
        self.limit(settings)

    def limit(self, settings: Settings) -> None:
        """Put the limits in force on the fields, where /openapi.json reads them too."""

    def channel_choice(self) -> validate.OneOf:
        """One of the configured channels."""
        channels = self.settings.channels
        return validate.OneOf(channels, error=f"must be one of {', '.join(channels)}")

    def check_send_at(self, data: dict[str, Any], name: str = "send_at") -> None:
        """send_at must be at least the configured lead time into the future."""
        send_at = data.get("send_at")
        if send_at is None:
            return
        earliest = utcnow() + timedelta(seconds=self.settings.min_send_at_lead)
        if send_at < earliest - timedelta(seconds=1):
            raise ValidationError(
                f"must be at least {int(self.settings.min_send_at_lead)} seconds in the future",
                name,
            )


def merge_aliases(data: Any, pairs: dict[str, str]) -> Any:
    """Fold alias spellings into their canonical key (``uuid`` -> ``id``...)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for alias, canonical in pairs.items():
        if alias in data:
            value = data.pop(alias)
            if canonical in data and data[canonical] != value:
                raise ValidationError(f"{alias} and {canonical} differ; send one of them", alias)
            data[canonical] = value
    return data


class KeyQuery(Schema):
    """Only ?key= (the API key, when not given as a Bearer token)."""

    class Meta:
        unknown = RAISE

    key = fields.String()


class MessageQuery(KeyQuery):
    """Query string of POST /message ("Add Message": ``key`` and the dry-run flag)."""

    dry_run = fields.Boolean(load_default=False, data_key="dryRun")

    @pre_load
    def _aliases(self, data: Any, **_: Any) -> Any:
        return merge_aliases(dict(data), {"isDryrun": "dryRun", "isDryRun": "dryRun"})


class BatchQuery(MessageQuery):
    """Query string of POST /batch ("Add Batch"): also ``allowMulti``."""

    allow_multi = fields.Boolean(load_default=False, data_key="allowMulti")


class WhatsAppTemplateSchema(Schema):
    """A WhatsApp message template, sent instead of ``message`` on the whatsapp channel.

    Business-initiated WhatsApp messages outside the 24-hour window must be approved
    templates; ``message`` still goes to every other channel (the SMS fallback).
    """

    class Meta:
        unknown = RAISE

    name = Text(required=True, validate=validate.Regexp(r"^[a-z0-9_]{1,512}$"))
    language = Text(required=True, validate=validate.Regexp(r"^[a-z]{2,3}(_[A-Za-z]{2,4})?$"))
    parameters = fields.List(
        Text(validate=validate.Length(min=1, max=1024)),
        load_default=list,
        validate=validate.Length(max=100),
    )


class BatchSchema(SettingsSchema):
    """Body of POST /batch (Messaging Plus API "Add Batch")."""

    sender = Text(required=True, data_key="from", validate=SENDER)
    message = Text(required=True)
    destinations = Phones(required=True)
    callback = Text(load_default=None, validate=URL, metadata={"format": "uri"})
    id = ClientUuid(load_default=None)
    send_at = Timestamp(load_default=None)
    channel = fields.String(load_default=None)
    fallback_channels = fields.List(fields.String(), load_default=list)
    whatsapp_template = fields.Nested(WhatsAppTemplateSchema, load_default=None)

    def limit(self, settings: Settings) -> None:
        body, count = settings.max_body_length, settings.max_destinations
        self.fields["message"].validators = [
            validate.Length(max=body, error=f"must be at most {body} characters"),
            validate.Regexp(r"^\s*\S", error="must not be empty"),
        ]
        self.fields["destinations"].validators = [
            validate.Length(min=1, max=count, error=f"must hold 1 to {count} numbers")
        ]
        self.fields["channel"].validators = [self.channel_choice()]
        self.fields["fallback_channels"].inner.validators = [self.channel_choice()]  # type: ignore[attr-defined]

    @pre_load
    def _aliases(self, data: Any, **_: Any) -> Any:
        return merge_aliases(data, {"uuid": "id", "at": "send_at"})

    @validates_schema
    def _rules(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("callback") is not None:
            check_callback(self.settings, data["callback"], field="callback", lookups=self.lookups)
        chain = [
            data.get("channel") or self.settings.default_channel,
            *data.get("fallback_channels", []),
        ]
        if data.get("whatsapp_template") and "whatsapp" not in chain:
            raise ValidationError("needs whatsapp among the channels", "whatsapp_template")
        self.check_send_at(data)

    @post_load
    def _channels(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        first = data.pop("channel") or self.settings.default_channel
        chain = [first] + [c for c in data.pop("fallback_channels") if c != first]
        data["channels"] = list(dict.fromkeys(chain))
        data["destinations"] = list(dict.fromkeys(data["destinations"]))
        return data


class SenderSchema(Schema):
    """``from`` of a /message entry: a custom ID, or a shared one from the pool."""

    class Meta:
        unknown = RAISE

    type = fields.String(required=True, validate=validate.OneOf(["custom", "shared"]))
    value = Text(load_default=None, validate=SENDER)

    @validates_schema
    def _value(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("type") == "custom" and not (data.get("value") or "").strip():
            raise ValidationError("is required when type is custom", "value")


class MessageSchema(SettingsSchema):
    """One entry of POST /message, after ``defaults`` were merged under it ("Add Message")."""

    to = Phone(required=True)
    sender = fields.Nested(SenderSchema, required=True, data_key="from")
    body = Text(required=True)
    callback = Text(load_default=None, validate=URL, metadata={"format": "uri"})
    channels = fields.List(fields.String(), load_default=None)
    id = ClientUuid(load_default=None)
    send_at = Timestamp(load_default=None)

    def limit(self, settings: Settings) -> None:
        body = settings.max_body_length
        self.fields["body"].validators = [
            validate.Length(max=body, error=f"must be at most {body} characters"),
            validate.Regexp(r"^\s*\S", error="must not be empty"),
        ]
        self.fields["channels"].validators = [
            validate.Length(min=1, error="must name at least one channel")
        ]
        self.fields["channels"].inner.validators = [self.channel_choice()]  # type: ignore[attr-defined]

    @validates_schema
    def _rules(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("callback") is not None:
            check_callback(self.settings, data["callback"], field="callback", lookups=self.lookups)
        self.check_send_at(data)

    @post_load
    def _channels(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        data["channels"] = list(dict.fromkeys(data["channels"] or [self.settings.default_channel]))
        return data


class MessagesEnvelope(SettingsSchema):
    """The envelope of POST /message: messages, and defaults merged under each.

    Each message, with ``defaults`` merged under it, must be a valid MplusMessage.
    """

    messages = fields.List(fields.Dict(), required=True)
    defaults = fields.Dict(load_default=dict)

    def limit(self, settings: Settings) -> None:
        count = settings.max_destinations
        self.fields["messages"].validators = [
            validate.Length(min=1, max=count, error=f"must hold 1 to {count} messages")
        ]


def load_messages(*, settings: Settings, body: Any) -> list[dict[str, Any]]:
    """Every entry of a POST /message body, ``defaults`` merged under it, validated.

    All entries are checked before any is accepted; errors name the entry's index
    (``messages.1.to``). Each result keeps ``to_as_sent``, echoed in the reply.
    """
    envelope = MessagesEnvelope(settings=settings).load(body)
    entries = envelope["messages"]
    if "id" in envelope["defaults"]:
        # Every message is its own batch: one id for all would make them conflict.
        raise ValidationError({"defaults": {"id": ["must be given per message"]}})
    schema = MessageSchema(settings=settings)
    errors: dict[int, Any] = {}
    loaded: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        merged = {**envelope["defaults"], **entry}
        try:
            data = schema.load(merged)
        except ValidationError as exc:
            errors[i] = exc.normalized_messages()
            continue
        if data["id"] is not None and seen.setdefault(data["id"], i) != i:
            errors[i] = {"id": [f"repeats the id of messages.{seen[data['id']]}"]}
        loaded.append({**data, "to_as_sent": merged["to"]})
    if errors:
        raise ValidationError({"messages": errors})
    return loaded


class PageQuery(KeyQuery):
    """?page=&pageSize=&status= of listings (pages count from 0)."""

    page = fields.Integer(load_default=0, validate=validate.Range(min=0, max=1_000_000))
    page_size = fields.Integer(
        load_default=100, data_key="pageSize", validate=validate.Range(min=1, max=1000)
    )
    status = fields.String(
        load_default=None, validate=validate.OneOf([s.value for s in RecipientStatus])
    )
