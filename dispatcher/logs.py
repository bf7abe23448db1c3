"""Logging for every process: one JSON object per line (or text for humans), ids from context.

The ids that matter (account, batch, recipient, callback, task) come from
``extra=`` on a log call or from :func:`bind`, which sets them for
everything logged inside it (a Celery task, an API request). Sentry is
optional and on only when ``DISPATCHER_SENTRY_DSN`` is set; its events are
scrubbed of message bodies and phone numbers before they leave.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dispatcher.config import Settings

# The ids a line may carry, as ``extra=`` keys or bound context.
IDS = ("account_id", "batch_id", "recipient_id", "callback_id", "task_id", "task_name")

_context: ContextVar[Mapping[str, str] | None] = ContextVar("dispatcher_log_context", default=None)


def _bound() -> Mapping[str, str]:
    return _context.get() or {}


@contextmanager
def bind(**ids: str | None) -> Iterator[None]:
    """Attach ids to every line logged inside the block (nested blocks add to them)."""
    token = _context.set({**_bound(), **{k: v for k, v in ids.items() if v}})
    try:
        yield
    finally:
        _context.reset(token)


def set_context(**ids: str | None) -> object:
    """Like :func:`bind` for callers with separate start and end hooks; returns a reset token."""
    return _context.set({**_bound(), **{k: v for k, v in ids.items() if v}})


def reset_context(token: object) -> None:
    """Undo a :func:`set_context`."""
    _context.reset(token)  # type: ignore[arg-type]


def _ids(record: logging.LogRecord) -> dict[str, str]:
    ids = dict(_bound())
    for key in IDS:
        value = record.__dict__.get(key)
        if value:
            ids[key] = str(value)
    return ids


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, ids, exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_ids(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """A human line: time, level, logger, message, then any ids as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = _ids(record)
        if ids:
            text += "  " + " ".join(f"{k}={v}" for k, v in ids.items())
        return text


def formatter(kind: str) -> logging.Formatter:
    """The formatter for ``DISPATCHER_LOG_FORMAT`` (json or text)."""
    return TextFormatter() if kind == "text" else JsonFormatter()


def configure(settings: Settings) -> None:
    """Send every logger's records to stderr in the configured format (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(settings.log_format))
    handler.set_name("dispatcher")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "dispatcher"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    init_sentry(settings)


# --- gunicorn ------------------------------------------------------------------------

# Path only (%(U)s), never the query string: ``?key=`` carries API keys. No
# referer either, which may carry the same URL.
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'


def gunicorn_logconfig(kind: str, level: str = "INFO") -> dict[str, Any]:
    """A ``logconfig_dict`` for gunicorn: its error and access logs in our format."""
    fmt = "dispatcher.logs.TextFormatter" if kind == "text" else "dispatcher.logs.JsonFormatter"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"dispatcher": {"()": fmt}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "dispatcher",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": [], "propagate": True},
            "gunicorn.access": {"level": "INFO", "handlers": [], "propagate": True},
        },
    }


# --- Sentry --------------------------------------------------------------------------

# Keys whose values are message content or a person's number, wherever they appear.
_SECRET_KEYS = frozenset(
    {
        "body",
        "message",
        "text",
        "to",
        "from",
        "destinations",
        "destination",
        "recipients",
        "msisdn",
        "phone",
        "sender",
        "payload",
        "data",
        "key",
        "authorization",
        "cookie",
        "query_string",
        "api_key",
    }
)
# An E.164-looking run of digits (with optional +, spaces or dashes inside).
_PHONE = re.compile(r"\+?\d(?:[\s-]?\d){6,14}")
FILTERED = "[Filtered]"


def scrub(value: Any, key: str = "") -> Any:
    """``value`` with message bodies, numbers and credentials replaced (a pure function)."""
    if key.lower() in _SECRET_KEYS and value not in (None, "", [], {}):
        return FILTERED
    if isinstance(value, Mapping):
        return {k: scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        return _PHONE.sub("[phone]", value)
    return value


def scrub_event(event: dict[str, Any], _hint: Any = None) -> dict[str, Any]:
    """Sentry's ``before_send``: the event with bodies, numbers and credentials removed."""
    clean: dict[str, Any] = {}
    for key, value in event.items():
        if key == "request" and isinstance(value, Mapping):
            request = {k: v for k, v in value.items() if k not in {"data", "query_string"}}
            if isinstance(request.get("url"), str):
                request["url"] = request["url"].split("?", 1)[0]
            clean[key] = scrub(request)
        elif key == "logentry" and isinstance(value, Mapping):
            # The template is ours; its parameters may be anything, numbers included.
            clean[key] = {
                "message": _PHONE.sub("[phone]", str(value.get("message", ""))),
                "params": scrub(list(value.get("params") or [])),
            }
        elif key in {"exception", "breadcrumbs", "extra", "contexts"}:
            clean[key] = scrub(value)
        elif key == "message":
            clean[key] = _PHONE.sub("[phone]", str(value))
        else:
            clean[key] = value
    return clean


def init_sentry(settings: Settings) -> bool:
    """Start Sentry with the Flask and Celery integrations, only when a DSN is set."""
    if not settings.sentry_dsn:
        return False
    try:
        import sentry_sdk
        from sentry_sdk.integrations.celery import CeleryIntegration
        from sentry_sdk.integrations.flask import FlaskIntegration
    except ImportError:
        logging.getLogger(__name__).error(
            "DISPATCHER_SENTRY_DSN is set but sentry-sdk is not installed "
            "(pip install 'dispatcher[sentry]'); continuing without Sentry"
        )
        return False
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.sentry_environment or None,
        integrations=[FlaskIntegration(), CeleryIntegration()],
        send_default_pii=False,
        include_local_variables=False,
        before_send=scrub_event,
    )
    return True
