"""Errors in the Messaging Plus / 8x8 shape: ``{code, message, errorId, timestamp}``.

Domain exceptions and HTTP errors become JSON here, in one place; views never
build error replies. Unexpected exceptions are logged with their errorId and
answered 500 in the same shape (and are bugs: client input must never cause one).

The app-wide part (``register``) also answers what no blueprint sees: routing
errors (404, 405 with ``Allow``), an over-long request target (414) or header
block (431), each in the shape of the dialect its path belongs to.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from flask import Blueprint, Flask, Response, jsonify, request
from marshmallow import ValidationError as SchemaError
from sqlalchemy.exc import IntegrityError, OperationalError
from werkzeug.exceptions import (
    HTTPException,
    MethodNotAllowed,
    RequestHeaderFieldsTooLarge,
    RequestURITooLarge,
)

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
    414: 1414,
    415: 1415,
    431: 1431,
    503: 2003,
    500: 2000,
}
STATUS = {
    errors.ValidationError: 400,
    errors.Unauthenticated: 401,
    errors.NotFound: 404,
    errors.Conflict: 409,
}

# The request head the app accepts; gunicorn's own limits (dispatcher/gunicorn_conf.py) are
# set above these so that the app, not gunicorn's HTML page, answers in the dialect's shape.
MAX_TARGET_BYTES = 8000
MAX_HEADER_FIELDS = 100
MAX_HEADER_BYTES = 16 * 1024

# A client such as urllib writes its whole body before it reads: closing on an unread
# body resets the connection and it never sees the 413. Read (and drop) at most this
# much so that it does; a larger declared body is not worth the bandwidth.
DRAIN_LIMIT = 64 * 1024 * 1024

Handler = Callable[[HTTPException], Response]


class NativeError(Exception):
    """An error answered exactly as given: the status, the dialect's numeric code, a message."""

    def __init__(self, status: int, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.code = code or CODES.get(status, status * 10)


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


def with_allow(exc: HTTPException, response: Response) -> Response:
    """RFC 9110 15.5.6: a 405 names the methods the target supports."""
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        response.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
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


def handle_native(exc: NativeError) -> Response:
    return error_response(exc.status, exc.message, code=exc.code)


def handle_domain(exc: errors.DispatcherError) -> Response:
    status = next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 400)
    message = (
        f"{exc.field}: {exc.message}" if exc.field and exc.field not in exc.message else exc.message
    )
    return error_response(status, message)


def handle_schema(exc: SchemaError) -> Response:
    # normalized_messages() keys a message raised with a field name by that name.
    return error_response(400, "; ".join(flatten(exc.normalized_messages())) or "invalid request")


def handle_http(exc: HTTPException) -> Response:
    status = exc.code or 500
    if status == 413:
        return error_response(413, "request body too large")
    return with_allow(exc, error_response(status, exc.description or exc.name))


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


def register_on(target: Blueprint) -> None:
    """Install the native error shape on a blueprint of a native-shaped dialect."""
    target.register_error_handler(NativeError, handle_native)
    target.register_error_handler(errors.DispatcherError, handle_domain)
    target.register_error_handler(SchemaError, handle_schema)
    target.register_error_handler(HTTPException, handle_http)
    # Blueprint-only: an app-wide handler for these classes would win over another
    # dialect's own catch-all and answer its clients in the wrong shape.
    target.register_error_handler(IntegrityError, handle_integrity)
    target.register_error_handler(OperationalError, handle_operational)


def check_head() -> None:
    """Refuse an over-long request target (414) or header block (431) before any view."""
    environ = request.environ
    target = environ.get("RAW_URI") or environ.get("REQUEST_URI") or request.full_path
    if len(target) > MAX_TARGET_BYTES:
        raise RequestURITooLarge(f"the request target is over {MAX_TARGET_BYTES} bytes")
    sizes = [len(k) + len(v) for k, v in request.headers.items()]
    if len(sizes) > MAX_HEADER_FIELDS or sum(sizes) > MAX_HEADER_BYTES:
        raise RequestHeaderFieldsTooLarge(
            f"at most {MAX_HEADER_FIELDS} header fields and {MAX_HEADER_BYTES} bytes of headers"
        )


def drain_body(response: Response) -> Response:
    """Read the unread body of a refused request (bounded), so the client sees the reply."""
    if response.status_code != 413:
        return response
    length = request.content_length
    if length is not None and length > DRAIN_LIMIT:
        return response
    stream = request.environ.get("wsgi.input")
    left = length if length is not None else DRAIN_LIMIT
    while stream is not None and left > 0:
        chunk = stream.read(min(left, 256 * 1024))
        if not chunk:
            break
        left -= len(chunk)
    response.headers["Connection"] = "close"
    return response


def register(
    app: Flask, *, by_prefix: dict[str, tuple[Handler, Callable[[Exception], Response]]]
) -> None:
    """App-wide handlers for what no blueprint handles, in the shape of the path's dialect."""

    def _pick(path: str) -> tuple[Handler, Callable[[Exception], Response]]:
        for prefix, handlers in by_prefix.items():
            if path.startswith(prefix):
                return handlers
        return handle_http, handle_unexpected

    app.before_request(check_head)
    app.after_request(drain_body)
    app.register_error_handler(HTTPException, lambda exc: _pick(request.path)[0](exc))
    app.register_error_handler(Exception, lambda exc: _pick(request.path)[1](exc))
