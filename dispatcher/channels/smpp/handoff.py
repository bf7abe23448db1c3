"""The Redis hand-off between send workers and the connector: keys and message shapes.

A worker pushes one request per carrier onto that carrier's list and waits on
its own reply key; whichever live connection of the carrier pops it submits
it. The ledger records per idempotency key what became of a submit, so a
worker that stopped waiting (or died) can be answered later by ``lookup``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PREFIX = "dispatcher:smpp:"
# A ledger entry outlives any receipt a carrier would still send.
LEDGER_TTL = 7 * 24 * 3600
ALIVE_TTL = 3


def queue_key(carrier: str) -> str:
    return f"{PREFIX}q:{carrier}"


def reply_key(request_id: str) -> str:
    return f"{PREFIX}r:{request_id}"


def alive_key(connection: str) -> str:
    return f"{PREFIX}alive:{connection}"


def ledger_key(idempotency_key: str) -> str:
    return f"{PREFIX}ledger:{idempotency_key}"


def part_key(part_id: str) -> str:
    return f"{PREFIX}part:{part_id}"


def left_key(message_id: str) -> str:
    return f"{PREFIX}left:{message_id}"


def stats_key(connection: str) -> str:
    return f"{PREFIX}stats:{connection}"


# Ledger values: "p" a submit was about to go out (outcome unknown if nothing follows),
# "a:<id>" accepted, "n" never sent, "u" sent but no submit_sm_resp came.
PENDING, NOT_SENT, UNKNOWN = "p", "n", "u"


def accepted(message_id: str) -> str:
    return f"a:{message_id}"


@dataclass(frozen=True)
class Item:
    """One message of a request."""

    key: str
    to: str
    sender: str
    body: str
    expire_at: str | None = None


@dataclass(frozen=True)
class Answer:
    """What became of one item: outcome is accepted, transient, channel, recipient or unknown."""

    outcome: str
    message_id: str | None = None
    code: str | None = None
    text: str | None = None
    retry_after: float | None = None

    def as_json(self) -> dict[str, Any]:
        fields = ("outcome", "message_id", "code", "text", "retry_after")
        return {k: v for k in fields if (v := getattr(self, k)) is not None}
