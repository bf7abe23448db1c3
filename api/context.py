"""Per-request access to the runtime, the session and the authenticated account."""

from __future__ import annotations

from flask import current_app, g, request
from sqlalchemy.orm import Session

from dispatcher.accounts import service as accounts
from dispatcher.accounts.models import Account
from dispatcher.config import Settings
from dispatcher.runtime import Runtime


def runtime() -> Runtime:
    """The process's runtime."""
    return current_app.extensions["dispatcher"]  # type: ignore[no-any-return]


def settings() -> Settings:
    """The settings in force."""
    return runtime().settings


def session() -> Session:
    """The request's session; its transaction is committed by the app after the view."""
    if "db_session" not in g:
        g.db_session = runtime().sessions()
    return g.db_session  # type: ignore[no-any-return]


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
        g.account = accounts.authenticate(session=session(), key=api_key())
    return g.account  # type: ignore[no-any-return]


def json_body() -> object:
    """The parsed JSON body; malformed or missing JSON is a ValidationError."""
    from dispatcher.errors import ValidationError

    data = request.get_json(force=True, silent=True)
    if data is None:
        raise ValidationError("the request body must be valid JSON")
    return data
