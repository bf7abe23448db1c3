"""Sinch delivery reports: our recipient states as Sinch statuses and codes, and the
callbacks of Sinch batches (``delivery_report_sms``, ``recipient_delivery_report_sms``).

The codes are Sinch's documented delivery report codes: 400-413 are its own
(400 Queued, 401 Dispatched, 402 unroutable, 403 internal error, 404 temporary
failure, 405 unmatched parameter, 406 internal expiry, 407 cancelled, 408 internal
reject, 411 parts limit); 0 is SMPP's "no error" (Delivered) and 254 SMPP's ESME_RDELIVERYFAILURE,
used for a carrier's failure receipt that gave no numeric code of its own.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import exists, select
from sqlalchemy.orm import object_session

from dispatcher.states import RecipientStatus
from dispatcher.webhooks.payloads import PendingCallback, iso

if TYPE_CHECKING:
    from dispatcher.batches.events import Change
    from dispatcher.batches.models import Batch

R = RecipientStatus

# Sinch status names whose messages will not change any more (its "Final" type).
FINAL = frozenset(
    {"Aborted", "Cancelled", "Rejected", "Deleted", "Delivered", "Failed", "Expired", "Unknown"}
)
STATUSES = ("Queued", "Dispatched", *sorted(FINAL))

_BY_STATE: dict[RecipientStatus, tuple[str, int]] = {
    R.SCHEDULED: ("Queued", 400),
    R.QUEUED: ("Queued", 400),
    # Claimed by a worker but not yet accepted by the carrier: still Sinch's Queued.
    R.SENDING: ("Queued", 400),
    R.SENT: ("Dispatched", 401),
    R.DELIVERED: ("Delivered", 0),
    # Sinch's SMS delivery reports have no read status: a read message stays Delivered.
    R.READ: ("Delivered", 0),
    R.CANCELLED: ("Cancelled", 407),
    R.EXPIRED: ("Expired", 406),
    R.REJECTED: ("Aborted", 408),
    R.FAILED: ("Failed", 254),
    # Sinch's "Unknown": dispatched to the SMSC, but no receipt came (or none could be read).
    R.UNKNOWN: ("Unknown", 0),
}
# Failures refine by the error our engine recorded (see engine/sending.py, channels/*).
_FAILED_BY_ERROR: dict[str, tuple[str, int]] = {
    "invalid": ("Rejected", 408),
    "unreachable": ("Aborted", 402),
    "no_provider": ("Aborted", 403),
    "busy": ("Aborted", 404),
    "network": ("Aborted", 404),
    "outcome_unknown": ("Unknown", 0),
    "parts_limit": ("Aborted", 411),
    # Sinch's 405 "Unmatched Parameter": a ${name} with no value and no default.
    "parameter_missing": ("Aborted", 405),
}


def status_of(status: RecipientStatus | str, error_code: str | None) -> tuple[str, int]:
    """The Sinch (status, code) of a recipient in ``status`` with ``error_code``."""
    state = RecipientStatus(status)
    if state in (R.FAILED, R.REJECTED) and error_code:
        if error_code in _FAILED_BY_ERROR:
            return _FAILED_BY_ERROR[error_code]
        if error_code.isdigit():
            return _BY_STATE[state][0], int(error_code)
        if error_code.startswith("http_"):
            return "Rejected", 408
    return _BY_STATE[state]


@dataclass(frozen=True)
class Outcome:
    """One recipient as a delivery report sees it."""

    to: str
    status: RecipientStatus
    error_code: str | None


def summary(
    *,
    batch: Batch,
    outcomes: Iterable[Outcome],
    full: bool,
    statuses: Sequence[str] | None = None,
    codes: Sequence[int] | None = None,
) -> dict[str, Any]:
    """A ``delivery_report_sms`` body: counts per (status, code), recipients if ``full``."""
    counts: Counter[tuple[str, int]] = Counter()
    recipients: dict[tuple[str, int], list[str]] = defaultdict(list)
    total = 0
    for o in outcomes:
        key = status_of(o.status, o.error_code)
        total += 1
        if statuses and key[0] not in statuses:
            continue
        if codes and key[1] not in codes:
            continue
        counts[key] += 1
        recipients[key].append(o.to)
    items = []
    for (name, code), count in sorted(counts.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        item: dict[str, Any] = {"code": code, "status": name, "count": count}
        if full:
            item["recipients"] = recipients[(name, code)]
        items.append(item)
    body: dict[str, Any] = {
        "type": "delivery_report_sms",
        "batch_id": batch.id,
        "total_message_count": total,
        "statuses": items,
    }
    if batch.options.get("client_reference") is not None:
        body["client_reference"] = batch.options["client_reference"]
    return body


def recipient_report(
    *,
    batch: Batch,
    to: str,
    status: RecipientStatus | str,
    error_code: str | None,
    at: datetime,
    parts: int | None = None,
    encoding: str | None = None,
    operator_status_at: datetime | None = None,
) -> dict[str, Any]:
    """A ``recipient_delivery_report_sms`` body."""
    name, code = status_of(status, error_code)
    body: dict[str, Any] = {
        "type": "recipient_delivery_report_sms",
        "batch_id": batch.id,
        "recipient": to,
        "code": code,
        "status": name,
        "at": iso(at),
        "applied_originator": batch.sender,
    }
    if operator_status_at is not None:
        body["operator_status_at"] = iso(operator_status_at)
    if parts is not None:
        body["number_of_message_parts"] = parts
    if encoding is not None:
        body["encoding"] = encoding
    if batch.options.get("client_reference") is not None:
        body["client_reference"] = batch.options["client_reference"]
    return body


def outcomes_of(session: Any, batch_id: str) -> list[Outcome]:
    """Every recipient of a batch, in batch order, as report outcomes."""
    from dispatcher.batches.models import Recipient

    rows = session.execute(
        select(Recipient.to, Recipient.status, Recipient.error_code)
        .where(Recipient.batch_id == batch_id)
        .order_by(Recipient.seq)
    )
    return [Outcome(to, RecipientStatus(status), code) for to, status, code in rows]


# States Sinch still reports as Queued or Dispatched (failures always map to final names).
IN_FLIGHT = frozenset(s for s, (name, _code) in _BY_STATE.items() if name not in FINAL)


def _in_flight(session: Any, batch_id: str) -> bool:
    """Whether any recipient of the batch is not yet in a final Sinch status."""
    from dispatcher.batches.models import Recipient

    return bool(
        session.scalar(
            select(exists().where(Recipient.batch_id == batch_id, Recipient.status.in_(IN_FLIGHT)))
        )
    )


def _message_sizes(batch: Batch, recipient_ids: Sequence[str]) -> dict[str, tuple[int, str]]:
    """Parts and encoding (GSM, UNICODE) of each recipient's message, for its report."""
    from dispatcher.batches.models import Recipient
    from dispatcher.sms import parts

    session = object_session(batch)
    if session is None or not recipient_ids:
        return {}
    rows = session.execute(
        select(Recipient.id, Recipient.parts, Recipient.body).where(
            Recipient.id.in_(list(recipient_ids))
        )
    )
    return {rid: (n, str(parts.analyse(body or batch.body).encoding)) for rid, n, body in rows}


def callbacks(
    *, batch: Batch, status: RecipientStatus, changes: Sequence[Change], at: datetime
) -> list[PendingCallback]:
    """Sinch callbacks for a status change, as the batch's ``delivery_report`` asks."""
    mode = batch.options.get("delivery_report", "none")
    # Delivered was reported already; Sinch has nothing more to say of a read one.
    if not batch.callback_url or mode == "none" or status is R.READ:
        return []
    if mode in ("per_recipient", "per_recipient_final"):
        out = []
        sizes = _message_sizes(batch, [c.recipient_id for c in changes])
        # Our receipts carry no SMSC timestamp: the time the operator's status was recorded.
        operator_at = at if status in (R.DELIVERED, R.FAILED) else None
        for c in changes:
            name, _code = status_of(status, c.error_code)
            if mode == "per_recipient_final" and name not in FINAL:
                continue
            parts, encoding = sizes.get(c.recipient_id, (None, None))
            payload = recipient_report(
                batch=batch,
                to=c.to,
                status=status,
                error_code=c.error_code,
                at=at,
                parts=parts,
                encoding=encoding,
                operator_status_at=operator_at,
            )
            out.append(
                PendingCallback(batch.callback_url, payload["type"], payload, c.recipient_id)
            )
        return out
    # summary / full: one report, sent by the change that leaves no message in flight.
    # The batch is loaded in the session whose transaction records this change, so the
    # query sees every recipient as it will be committed.
    session = object_session(batch)
    if session is None:
        return []
    # Concurrent last changes must not each see the other still in flight (and so
    # both skip the report): on PostgreSQL they queue here on the batch row.
    session.refresh(batch, with_for_update=True)
    # One indexed question per change; the whole batch is loaded only once it is final.
    if _in_flight(session, batch.id):
        return []
    outcomes = outcomes_of(session, batch.id)
    payload = summary(batch=batch, outcomes=outcomes, full=mode == "full")
    return [PendingCallback(batch.callback_url, payload["type"], payload, None)]
