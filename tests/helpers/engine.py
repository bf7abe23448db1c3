"""Helpers of the engine's system tests: numbers by prefix and batches sent through the API."""

from __future__ import annotations

from flask.testing import FlaskClient

from tests.factories import Tenant


def numbers(prefix: str, count: int, start: int = 0) -> list[str]:
    width = 12 - len(prefix.lstrip("+"))
    return [f"{prefix}{i:0{width}d}" for i in range(start, start + count)]


def send(api: FlaskClient, account: Tenant, destinations: list[str], **extra: object) -> str:
    body = {"from": "Dispatcher", "message": "hello", "destinations": destinations, **extra}
    reply = api.post("/batch?allowMulti=true", json=body, headers=account.auth)
    assert reply.status_code == 200, reply.get_json()
    return str(reply.get_json()["identifier"])
