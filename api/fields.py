"""Marshmallow fields shared by every dialect: numbers, channels, URLs, times."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from marshmallow import ValidationError, fields

from dispatcher import netsafety
from dispatcher.config import Settings
from dispatcher.phones import InvalidNumber, to_e164

CLIENT_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,100}$")


class Phone(fields.String):
    """An E.164 number (leading + optional), normalised to +digits."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if not isinstance(value, str):
            raise ValidationError("must be a string phone number")
        try:
            return to_e164(value)
        except InvalidNumber as exc:
            raise ValidationError(str(exc)) from exc


class Timestamp(fields.DateTime):
    """ISO 8601; a value without a zone is UTC (GMT, as the seeds say); stored naive UTC."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(format="iso", **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        if not isinstance(value, str):
            raise ValidationError("must be an ISO 8601 timestamp string")
        parsed: datetime = super()._deserialize(value, attr, data, **kwargs)
        if parsed.tzinfo is not None:
            parsed = parsed.astimezone(UTC).replace(tzinfo=None)
        return parsed


class ClientId(fields.String):
    """A client-chosen identifier: 1-100 of letters, digits and ._:-"""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not CLIENT_ID.match(text):
            raise ValidationError("must be 1-100 characters of letters, digits and ._:-")
        return text


def check_channel(settings: Settings, value: Any) -> str:
    """A configured channel name, or a ValidationError naming the choices."""
    if not isinstance(value, str) or value not in settings.channels:
        raise ValidationError(f"must be one of {', '.join(settings.channels)}")
    return value


def check_callback(settings: Settings, value: Any) -> str:
    """An http(s) callback URL that does not point into private networks (unless allowed)."""
    if not isinstance(value, str) or len(value) > 2048:
        raise ValidationError("must be an http(s) URL of at most 2048 characters")
    try:
        netsafety.check_url(value, allow=settings.callback_allowlist)
    except netsafety.UnsafeURL as exc:
        raise ValidationError(str(exc)) from exc
    return value
