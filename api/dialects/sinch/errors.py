"""Errors in Sinch's shape, ``{"code": "...", "text": "..."}``, for the Sinch blueprint only.

Codes are Sinch's: 400 ``syntax_invalid_json`` / ``syntax_invalid_parameter_format``
/ ``syntax_constraint_violation``; 401 ``unauthorized``; 403 ``forbidden`` (a token
used with a service plan it does not belong to); 404 ``not_found``. Ours, in the same
shape: 409 ``conflict`` (a concurrent request stored the same row; retry), 503
``service_unavailable`` (the database could not take the request; retry) and 500
``internal_error`` (a bug, logged with the traceback).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, jsonify
from marshmallow import ValidationError as SchemaError
from sqlalchemy.exc import IntegrityError, OperationalError
from werkzeug.exceptions import HTTPException

from api.errors import flatten, with_allow
from dispatcher import errors

log = logging.getLogger(__name__)

INVALID_JSON = "syntax_invalid_json"
INVALID_FORMAT = "syntax_invalid_parameter_format"
CONSTRAINT = "syntax_constraint_violation"

# Marshmallow's and our fields' messages for a value of the wrong form (not a broken rule).
_FORMAT_HINTS = (
    "Not a valid",
    "E.164",
    "ISO 8601",
    "must be a string",
    "base64",
    "hex",
    "NUL characters",
    "valid Unicode",
)


class SinchError(Exception):
    """An error answered exactly as given."""

    def __init__(self, status: int, code: str, text: str) -> None:
        super().__init__(text)
        self.status, self.code, self.text = status, code, text


def error_response(status: int, code: str, text: str) -> Response:
    """A Sinch error reply."""
    response = jsonify({"code": code, "text": text})
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="xms"'
    return response


def _code_for(text: str) -> str:
    return INVALID_FORMAT if any(hint in text for hint in _FORMAT_HINTS) else CONSTRAINT


def handle_sinch(exc: SinchError) -> Response:
    return error_response(exc.status, exc.code, exc.text)


def handle_domain(exc: errors.DispatcherError) -> Response:
    text = (
        f"{exc.field}: {exc.message}" if exc.field and exc.field not in exc.message else exc.message
    )
    if isinstance(exc, errors.Unauthenticated):
        return error_response(401, "unauthorized", text)
    if isinstance(exc, errors.NotFound):
        return error_response(404, "not_found", text)
    # Conflicts (a batch that already started sending) are a 400 too: Sinch documents
    # 400, 403 and 404 as its client errors, and SDKs switch on those.
    return error_response(400, _code_for(text), text)


def handle_schema(exc: SchemaError) -> Response:
    # normalized_messages() keys a message raised with a field name by that name.
    text = "; ".join(flatten(exc.normalized_messages())) or "invalid request"
    return error_response(400, _code_for(text), text)


def handle_http(exc: HTTPException) -> Response:
    status = exc.code or 500
    names = {
        404: "not_found",
        405: "method_not_allowed",
        413: "request_too_large",
        414: "uri_too_long",
        431: "request_header_fields_too_large",
    }
    text = "request body too large" if status == 413 else exc.description or exc.name
    return with_allow(exc, error_response(status, names.get(status, "error"), text))


def handle_integrity(exc: IntegrityError) -> Response:
    # Two requests raced past an existence check; the loser's transaction is rolled
    # back by the app's teardown and the client may retry.
    log.warning("integrity conflict on the Sinch API: %s", exc.orig)
    return error_response(409, "conflict", "a concurrent request stored the same object; retry")


def handle_operational(exc: OperationalError) -> Response:
    log.exception("database unavailable")
    return error_response(
        503, "service_unavailable", "temporarily unable to store the request; retry"
    )


def handle_unexpected(exc: Exception) -> Response:
    # A bug (client input must never get here), answered in the shape Sinch clients parse.
    log.exception("unhandled error on the Sinch API")
    return error_response(500, "internal_error", "internal error")


# Most specific first is not needed: Flask picks the handler of the nearest class.
HANDLERS: dict[type[Exception], Callable[[Any], Response]] = {
    SinchError: handle_sinch,
    errors.DispatcherError: handle_domain,
    SchemaError: handle_schema,
    HTTPException: handle_http,
    IntegrityError: handle_integrity,
    OperationalError: handle_operational,
    Exception: handle_unexpected,
}


def register_on(blueprint: Blueprint) -> None:
    """Install the Sinch error shape on the blueprint."""
    for cls, handler in HANDLERS.items():
        blueprint.register_error_handler(cls, handler)
