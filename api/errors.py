"""Errors in the Messaging Plus / 8x8 shape: ``{code, message, errorId, timestamp}``.

Domain exceptions and HTTP errors become JSON here, in one place; views never
build error replies. Unexpected exceptions are logged with their errorId and
answered 500 in the same shape (and are bugs: client input must never cause one).
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

from flask import Blueprint, Flask, Response, jsonify
from marshmallow import ValidationError as SchemaError
from sqlalchemy.exc import IntegrityError, OperationalError
from werkzeug.exceptions import HTTPException

from dispatcher import errors

log = logging.getLogger(__name__)

# Numeric codes of the 8x8 error shape (8x8 Chat Apps API); 1001 and 1200 are theirs.
CODES = {
    400: 1000,
    401: 1200,
    403: 1001,
    404: 1404,
    405: 1405,
    409: 1409,
    413: 1413,
    415: 1415,
    503: 2003,
    500: 2000,
}
STATUS = {
    errors.ValidationError: 400,
    errors.Unauthenticated: 401,
    errors.NotFound: 404,
    errors.Conflict: 409,
}


def error_response(status: int, message: str, *, code: int | None = None) -> Response:
    """A JSON error reply in the native shape."""
    body = {
        "code": code or CODES.get(status, status * 10),
        "message": message,
        "errorId": str(uuid.uuid4()),
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    response = jsonify(body)
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="dispatcher"'
    return response


def flatten(messages: object, prefix: str = "") -> list[str]:
    """Marshmallow's nested error dict as ``field: message`` lines."""
    if isinstance(messages, dict):
        out: list[str] = []
        for key, value in messages.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if key == "_schema":
                name = prefix or "body"
            out.extend(flatten(value, name))
        return out
    if isinstance(messages, list):
        if all(isinstance(m, str) for m in messages):
            return [f"{prefix}: {m}" if prefix else m for m in messages]
        return [line for m in messages for line in flatten(m, prefix)]
    return [f"{prefix}: {messages}" if prefix else str(messages)]


def service_unavailable() -> Response:
    """The database could not commit: the client may retry (nothing was stored)."""
    return error_response(503, "temporarily unable to store the request; retry")


def handle_domain(exc: errors.DispatcherError) -> Response:
    status = next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 400)
    message = (
        f"{exc.field}: {exc.message}" if exc.field and exc.field not in exc.message else exc.message
    )
    code = 1002 if exc.field and "number" in exc.message else None
    return error_response(status, message, code=code)


def handle_schema(exc: SchemaError) -> Response:
    # normalized_messages() keys a message raised with a field name by that name.
    return error_response(400, "; ".join(flatten(exc.normalized_messages())) or "invalid request")


def handle_http(exc: HTTPException) -> Response:
    status = exc.code or 500
    if status == 413:
        return error_response(413, "request body too large")
    return error_response(status, exc.description or exc.name)


def handle_integrity(exc: IntegrityError) -> Response:
    # Two requests raced past an existence check (the same client id, the same
    # shared-sender row): the loser's transaction is rolled back and may be retried.
    response = error_response(409, "a concurrent request stored the same object; retry")
    log.warning("integrity conflict %s: %s", response.get_json()["errorId"], exc.orig)
    return response


def handle_operational(exc: OperationalError) -> Response:
    log.exception("database unavailable")
    return service_unavailable()


def handle_unexpected(exc: Exception) -> Response:
    response = error_response(500, "internal error")
    log.exception("unhandled error %s", response.get_json()["errorId"])
    return response


def _register_common(target: Flask | Blueprint) -> None:
    target.register_error_handler(errors.DispatcherError, handle_domain)
    target.register_error_handler(SchemaError, handle_schema)
    target.register_error_handler(HTTPException, handle_http)


def register_on(target: Flask | Blueprint) -> None:
    """Install the native error shape on a blueprint of a native-shaped dialect."""
    _register_common(target)
    # Blueprint-only: an app-wide handler for these classes would win over another
    # dialect's own catch-all and answer its clients in the wrong shape.
    target.register_error_handler(IntegrityError, handle_integrity)
    target.register_error_handler(OperationalError, handle_operational)


def register(app: Flask) -> None:
    """App-wide handlers: routing errors, size limits and anything a blueprint missed."""
    _register_common(app)
    app.register_error_handler(Exception, handle_unexpected)
