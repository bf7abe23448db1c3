"""Marshmallow fields shared by every dialect: numbers, channels, URLs, times, text."""

from __future__ import annotations

import re
import socket
import time
from datetime import UTC, datetime
from typing import Any

from marshmallow import ValidationError, fields, validate

from dispatcher import netsafety
from dispatcher.config import Settings
from dispatcher.errors import NotFound
from dispatcher.phones import InvalidNumber, plain_e164, to_e164

UUID_TEXT = re.compile(r"^[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")
# ASCII only: str.isdigit() also accepts Arabic-Indic, fullwidth... digits, which
# phonenumbers would silently fold into a different, valid-looking number.
E164_TEXT = re.compile(r"^\+?[0-9]+$")
LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){LABEL}(?:\.{LABEL})*$")
# Far enough for any schedule, near enough that adding an expiry cannot overflow.
LATEST = datetime(9000, 1, 1)


def storable(text: str) -> str | None:
    """Why ``text`` cannot be stored as it is (NUL, lone surrogates), or None."""
    if "\x00" in text:
        return "must not contain NUL characters"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (no lone surrogates)"
    return None


# Documented as the JSON Schema ``pattern`` too (anchored, so search and match agree).
NOT_BLANK = validate.Regexp(r"^\s*\S", error="must not be blank")


class Text(fields.String):
    """A string every database can store: no NUL, no lone surrogates."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text: str = super()._deserialize(value, attr, data, **kwargs)
        problem = storable(text)
        if problem:
            raise ValidationError(problem)
        return text


class Phone(fields.String):
    """An E.164 number (leading + optional), normalised to +digits."""

    def __init__(self, **kwargs: Any) -> None:
        pattern = r"^\s*\+?[0-9]{1,19}\s*$"
        super().__init__(metadata={"pattern": pattern, "example": "+447700900123"}, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if not isinstance(value, str):
            raise ValidationError("must be a string phone number")
        if not E164_TEXT.match(value.strip()):
            shown = value if storable(value) is None else ascii(value)
            raise ValidationError(
                f"{shown!r} is not an E.164 number (ASCII digits only, optional +)"
            )
        try:
            return to_e164(value)
        except InvalidNumber as exc:
            raise ValidationError(str(exc)) from exc


class Phones(fields.List):
    """A list of numbers (a batch's destinations), checked in one pass.

    The same rules, messages and errors by index as ``List(Phone())``, but a string
    item goes straight to the item field's conversion (for a string, all that
    marshmallow's per-item ``deserialize`` does besides): intake's hottest loop.
    """

    def __init__(self, inner: Phone | None = None, **kwargs: Any) -> None:
        super().__init__(inner or Phone(), **kwargs)
        assert not self.inner.validators, "item validators would be skipped"

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[Any]:
        if not isinstance(value, list):
            return super()._deserialize(value, attr, data, **kwargs)
        convert = self.inner._deserialize
        result: list[Any] = []
        errors: dict[int, Any] = {}
        for index, each in enumerate(value):
            # Most numbers are already E.164: those take no exception handler, no call
            # through the item field, no second look at their digits.
            if isinstance(each, str) and (number := plain_e164(each)) is not None:
                result.append(number)
                continue
            try:
                if isinstance(each, str):
                    result.append(convert(each, attr, data))
                else:
                    result.append(self.inner.deserialize(each, **kwargs))
            except ValidationError as error:
                errors[index] = error.messages
        if errors:
            raise ValidationError(errors, valid_data=result)
        return result


class Timestamp(fields.DateTime):
    """ISO 8601; a value without a zone is UTC (Messaging Plus says GMT); stored naive UTC."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(format="iso", **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        if not isinstance(value, str):
            raise ValidationError("must be an ISO 8601 timestamp string")
        parsed: datetime = super()._deserialize(value, attr, data, **kwargs)
        try:
            if parsed.tzinfo is not None:
                parsed = parsed.astimezone(UTC).replace(tzinfo=None)
        except OverflowError as exc:
            raise ValidationError("is out of range") from exc
        if parsed >= LATEST:
            raise ValidationError(f"must be before {LATEST.date().isoformat()}")
        return parsed


class NaiveUtc(fields.DateTime):
    """A stored (naive UTC) time written as ISO 8601 with ``Z``, to ``TIMESPEC``."""

    TIMESPEC = "seconds"

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.isoformat(timespec=self.TIMESPEC) + "Z"


class ClientUuid(fields.String):
    """A client-chosen UUID in its 8-4-4-4-12 hex form (the Messaging Plus ``id``/``uuid``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(metadata={"format": "uuid", "pattern": UUID_TEXT.pattern}, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not UUID_TEXT.match(text):
            raise ValidationError("must be a UUID (8-4-4-4-12 hex digits)")
        return text


def check_channel(settings: Settings, value: Any, *, field: str | None = None) -> str:
    """A configured channel name, or a ValidationError (on ``field``) naming the choices."""
    if not isinstance(value, str) or value not in settings.channels:
        message = f"must be one of {', '.join(settings.channels)}"
        raise ValidationError(message, field) if field else ValidationError(message)
    return value


class _Unresolved(Exception):
    """The callback's host has no DNS answer right now."""


class Lookups:
    """The DNS answers for one request's callback hosts: each host asked once, and all
    of them within one bound, so a client's slow DNS zone cannot hold an API worker."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline: float | None = None
        self.answers: dict[str, list[str] | None] = {}

    def __call__(self, host: str) -> list[str]:
        if host not in self.answers:
            if self.deadline is None:
                self.deadline = time.monotonic() + self.seconds
            left = self.deadline - time.monotonic()
            try:
                if left <= 0:
                    raise netsafety.ResolveTimeout("the request's DNS time is spent")
                self.answers[host] = netsafety.bounded(netsafety.default_resolve, left)(host)
            except (socket.gaierror, netsafety.ResolveTimeout):
                self.answers[host] = None
        answer = self.answers[host]
        if answer is None:
            raise _Unresolved(host)
        return answer


def check_callback(
    settings: Settings, value: Any, *, field: str | None = None, lookups: Lookups | None = None
) -> str:
    """An http(s) callback URL that does not point into private networks (unless allowed).

    A well-formed host that does not resolve at intake (or not within the request's
    ``lookups`` bound) is accepted: DNS may be down or the endpoint not published yet,
    and the sender re-checks every address right before each delivery, which is where
    the SSRF guard has to hold anyway.
    """

    def refuse(message: str) -> ValidationError:
        return ValidationError(message, field) if field else ValidationError(message)

    if not isinstance(value, str) or len(value) > 2048:
        raise refuse("must be an http(s) URL of at most 2048 characters")
    resolve = lookups or Lookups(settings.callback_resolve_timeout)
    try:
        netsafety.check_url(value, allow=settings.callback_allowlist, resolve=resolve)
    except netsafety.UnsafeURL as exc:
        raise refuse(str(exc)) from exc
    except _Unresolved as exc:
        host = str(exc).lower().rstrip(".")
        if not HOSTNAME.match(host):
            raise refuse(f"URL host {host!r} is not a valid host name") from exc
    return value


def path_ref(raw: str, *, what: str) -> str:
    """An id from a URL; what cannot name a ``what`` is simply not found.

    Checked before any query: PostgreSQL refuses NUL in text parameters outright.
    """
    if not 1 <= len(raw) <= 100 or storable(raw) or not raw.isprintable():
        raise NotFound(f"{what} not found")
    return raw


def batch_ref(raw: str) -> str:
    """A batch id or client id from a URL (see path_ref)."""
    return path_ref(raw, what="batch")
