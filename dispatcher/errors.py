"""Domain exceptions; each API dialect maps them to its own error shape in one handler."""

from __future__ import annotations


class DispatcherError(Exception):
    """Base of every error the domain raises on purpose."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class ValidationError(DispatcherError):
    """The request is malformed or breaks a rule (HTTP 400)."""


class Unauthenticated(DispatcherError):
    """No valid API key (HTTP 401)."""


class NotFound(DispatcherError):
    """No such object for this account; other tenants' objects are not found either (404)."""


class Conflict(DispatcherError):
    """The request conflicts with the object's state (HTTP 409)."""
