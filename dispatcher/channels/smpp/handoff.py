"""The Redis hand-off between send workers and the connector: keys and message shapes.

A worker pushes one request per carrier onto that carrier's list and waits on
its own reply key; whichever live connection of the carrier pops it submits
it. The ledger records per idempotency key what became of a submit, so a
worker that stopped waiting (or died) can be answered later by ``lookup``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from functools import partial
from typing import Any

from dispatcher.channels.base import OutboundMessage, Outcome, Receipt, SendResult, SmsOptions

PREFIX = "dispatcher:smpp:"
# A ledger entry outlives any receipt a carrier would still send.
LEDGER_TTL = 7 * 24 * 3600
ALIVE_TTL = 3


def key(kind: str, name: str) -> str:
    """One of the hand-off's Redis keys: ``dispatcher:smpp:<kind>:<name>``."""
    return f"{PREFIX}{kind}:{name}"


# A carrier's request list, a request's reply, a bound connection's flag, a submit's
# ledger entry, a part's message id, a message's parts not yet delivered and those
# delivered (each part counted once, see connector.translate), counters.
queue_key = partial(key, "q")
reply_key = partial(key, "r")
alive_key = partial(key, "alive")
ledger_key = partial(key, "ledger")
part_key = partial(key, "part")
left_key = partial(key, "left")
done_key = partial(key, "done")
stats_key = partial(key, "stats")
# The generation of the hand-off's data: set by the first request pushed into it and
# never expiring, so another value (or none) later means Redis lost what it held.
GENERATION = f"{PREFIX}generation"
# Receipts the connector has read, for a worker to apply (one JSON list per group).
RECEIPTS = f"{PREFIX}receipts"
# Groups a worker took and has not committed yet: one list per claim, and the claims by
# when they were made. A claim older than any task can run was left by a killed worker.
RECEIPT_CLAIMS = f"{PREFIX}receipts:claims"
claim_key = partial(key, "receipts:claim")

# Ledger values: "p" a submit was about to go out (outcome unknown if nothing follows),
# "a:<id>" accepted, "n" never sent, "u" sent but no submit_sm_resp came.
PENDING, NOT_SENT, UNKNOWN = "p", "n", "u"
# Error codes of a submit that may have reached the SMSC: never sent again.
UNSETTLED = frozenset({"outcome_unknown", "partial_submit"})
UNKNOWN_TEXT = "no submit_sm_resp (bind lost or response timeout); not re-sent to avoid a duplicate"
LOST_TEXT = "Redis lost its data while the connector had this; not re-sent to avoid a duplicate"


def unknown(text: str = UNKNOWN_TEXT) -> SendResult:
    """A submit that may have reached the SMSC: final as unknown, never resent."""
    return SendResult(Outcome.UNKNOWN, error_code="outcome_unknown", error_text=text)


def accepted(message_id: str) -> str:
    return f"a:{message_id}"


def ledger_value(result: SendResult) -> str:
    """What the ledger keeps of a request's result."""
    if result.outcome is Outcome.ACCEPTED:
        return accepted(result.provider_message_id or "")
    return UNKNOWN if result.error_code in UNSETTLED else NOT_SENT


@dataclass(frozen=True)
class Item:
    """One message of a request, as JSON-safe values."""

    key: str
    to: str
    sender: str
    body: str
    expire_at: str | None = None
    sms: dict[str, Any] | None = None

    @classmethod
    def of(cls, m: OutboundMessage) -> Item:
        expire = m.expire_at.isoformat() if m.expire_at else None
        sms = asdict(m.sms) if m.sms else None
        return cls(m.idempotency_key, m.to, m.sender, m.body, expire, sms)

    @property
    def options(self) -> SmsOptions:
        return SmsOptions(**self.sms) if self.sms else SmsOptions()


def result_json(result: SendResult) -> list[Any]:
    """A result as the connector answers it: its fields in order, a list, not a mapping."""
    r = result
    return [r.outcome.value, r.provider_message_id, r.error_code, r.error_text, r.retry_after]


def result_of(raw: list[Any]) -> SendResult:
    """A result from the connector's answer."""
    return SendResult(Outcome(raw[0]), *raw[1:])


def receipts_json(receipts: list[Receipt]) -> str:
    """A group of receipts as one compact JSON list of field tuples (done_at as ISO text)."""
    return json.dumps(
        [
            (
                r.provider_message_id,
                r.status,
                r.error_code,
                r.error_text,
                r.done_at.isoformat() if r.done_at else None,
                r.carrier_status,
            )
            for r in receipts
        ]
    )


def receipts_of(raw: bytes | str) -> list[Receipt]:
    """The receipts of one group written by :func:`receipts_json`."""
    return [
        Receipt(ref, status, code, text, datetime.fromisoformat(done) if done else None, carrier)
        for ref, status, code, text, done, carrier in json.loads(raw)
    ]
