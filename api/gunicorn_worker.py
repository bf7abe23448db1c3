"""gunicorn's sync worker, answering what gunicorn itself refuses in the native JSON shape.

A request line over gunicorn's bounded maximum (8,190 bytes) or a header block over its
limits is refused before the app sees it; stock gunicorn answers with an HTML page.
The path is not known then, so the reply is the native shape, never Sinch's.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from gunicorn import util
from gunicorn.http.errors import LimitRequestHeaders, LimitRequestLine
from gunicorn.workers.sync import SyncWorker

from api.errors import CODES

REFUSED: dict[type[Exception], tuple[int, str, str]] = {
    LimitRequestLine: (414, "URI Too Long", "request line too long"),
    LimitRequestHeaders: (431, "Request Header Fields Too Large", "request headers too large"),
}


def error_reply(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 response carrying the native error body."""
    body = json.dumps(
        {
            "code": CODES[status],
            "message": message,
            "errorId": str(uuid.uuid4()),
            "timestamp": datetime.now(UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
        }
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


class JsonErrorWorker(SyncWorker):
    def handle_error(self, req: Any, client: Any, addr: Any, exc: Exception) -> None:
        for kind, (status, reason, message) in REFUSED.items():
            if isinstance(exc, kind):
                self.log.warning("Invalid request from ip=%s: %s", (addr or ("",))[0], exc)
                try:
                    util.write_nonblock(client, error_reply(status, reason, message))
                except OSError:
                    self.log.debug("Failed to send error message.")
                return
        super().handle_error(req, client, addr, exc)
