"""Per-request access to the runtime, the session and the authenticated account."""

from __future__ import annotations

import json
from typing import Any

from flask import current_app, g, request
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from dispatcher.accounts import service as accounts
from dispatcher.accounts.models import Account
from dispatcher.config import Settings
from dispatcher.db import WRITE_PRIORITY, begin_read_only, read_transaction
from dispatcher.errors import ValidationError
from dispatcher.runtime import Runtime


def runtime() -> Runtime:
    """The process's runtime."""
    return current_app.extensions["dispatcher"]


def settings() -> Settings:
    """The settings in force."""
    return runtime().settings


def session() -> Session:
    """The request's session; its transaction is committed by the app after the view.

    GET and HEAD only read: on SQLite they must not take the single write lock.
    Other requests write ahead of a waiting worker there (a client waits for the reply).
    """
    if "db_session" not in g:
        if request.method in ("GET", "HEAD"):
            g.db_session = runtime().sessions()
            begin_read_only(g.db_session)
        else:
            g.db_session = runtime().sessions(bind=_writer())
    return g.db_session


def _writer() -> Engine:
    """The runtime's engine, marked as the API's writer (``WriteGate``); made once per
    engine (tests give an app another runtime)."""
    engine = runtime().engine
    cached: tuple[Engine, Engine] | None = current_app.extensions.get("dispatcher_writer")
    if cached is None or cached[0] is not engine:
        cached = (engine, engine.execution_options(**{WRITE_PRIORITY: True}))
        current_app.extensions["dispatcher_writer"] = cached
    return cached[1]


def api_key() -> str | None:
    """The key from ``Authorization: Bearer`` or ``?key=``."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.args.get("key") or None


def account() -> Account:
    """The authenticated account (Unauthenticated otherwise)."""
    if "account" not in g:
        # Its own short read: the write transaction (and SQLite's lock) starts only
        # once the body is validated and the service writes.
        with read_transaction(runtime().sessions) as reader:
            g.account = accounts.authenticate(session=reader, key=api_key())
    return g.account


def json_body() -> Any:
    """The parsed JSON body; malformed or missing JSON is a ValidationError."""
    # get_data() raises 413 past MAX_CONTENT_LENGTH; json.loads is called here rather
    # than through get_json() because deep nesting raises RecursionError, not ValueError.
    raw = request.get_data(cache=True)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        data = None
    if data is None:
        raise ValidationError("the request body must be valid JSON")
    return data
