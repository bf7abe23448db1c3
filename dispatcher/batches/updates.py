"""Changing batches after intake: update, replace and delivery feedback.

A batch may change only while it has not started sending (``scheduled`` or
``queued``). Each change starts with one conditional UPDATE of the batch row on
that status: it either wins (and, on PostgreSQL, holds the row until commit) or
the batch has started and the caller gets a Conflict naming why.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, delete, update
from sqlalchemy.orm import Session

from dispatcher.accounts.models import Account
from dispatcher.batches.models import Batch, Recipient
from dispatcher.batches.queries import destinations_of
from dispatcher.batches.service import (
    NewBatch,
    fingerprint,
    fit_parts,
    follow_send_at,
    get_batch,
    insert_recipients,
    promote_if_due,
)
from dispatcher.batches.transitions import transition_recipients
from dispatcher.config import Settings
from dispatcher.db import utcnow
from dispatcher.errors import Conflict, ValidationError
from dispatcher.states import BatchStatus, RecipientStatus

NOT_STARTED = (BatchStatus.SCHEDULED, BatchStatus.QUEUED)
# Sinch: expire_at defaults to, and may be at most, 3 days after send_at.
MAX_EXPIRY = timedelta(days=3)


@dataclass(frozen=True)
class Window:
    """When a batch is sent and when it expires; ``default_expiry`` when expire_at was not given."""

    send_at: datetime
    expire_at: datetime
    default_expiry: bool


def window(*, send_at: datetime | None, expire_at: datetime | None, now: datetime) -> Window:
    """send_at in the past means now; expire_at defaults to, and is capped at, send_at + 3 days."""
    start = max(send_at or now, now)
    if expire_at is None:
        return Window(start, start + MAX_EXPIRY, True)
    if expire_at <= start:
        raise ValidationError(
            "expire_at must be after send_at (and in the future)", field="expire_at"
        )
    if expire_at > (send_at or start) + MAX_EXPIRY:
        raise ValidationError("expire_at must be at most 3 days after send_at", field="expire_at")
    return Window(start, expire_at, False)


# A Sinch parameter in a body: ``${name}``.
PLACEHOLDER = re.compile(r"\$\{([^}]+)\}")


def render(
    body: str,
    destinations: Sequence[str],
    parameters: Mapping[str, Mapping[str, str]] | None,
    *,
    max_length: int,
    unmatched: dict[int, str] | None = None,
) -> list[str] | None:
    """Per-recipient bodies with ``${name}`` replaced (recipient's value, else ``default``).

    None when there are no parameters. A placeholder with neither a value for a
    recipient nor a default is a ValidationError naming the recipient, unless
    ``unmatched`` is given: then that recipient's index is recorded there with
    ``parameter_missing`` (Sinch fails only that message). A rendered body longer
    than ``max_length`` is always a ValidationError.
    """
    if not parameters:
        return None
    used = [name for name in dict.fromkeys(PLACEHOLDER.findall(body)) if name in parameters]
    out = []
    for index, to in enumerate(destinations):
        values: dict[str, str] = {}
        for name in used:
            mapping = parameters[name]
            value = mapping.get(to, mapping.get("default"))
            if value is None and unmatched is not None:
                unmatched[index] = "parameter_missing"
                continue
            if value is None:
                raise ValidationError(
                    f"parameter {name!r} has no value for {to} and no default", field="parameters"
                )
            values[name] = value
        rendered = _substitute(body, values) if used else body
        # Values repeat per placeholder: without a cap a small request could expand
        # into gigabytes of bodies (500 placeholders x 2,000 characters x 1,000 numbers).
        if len(rendered) > max_length:
            raise ValidationError(
                f"the body for {to} is {len(rendered)} characters with its parameters; "
                f"at most {max_length}",
                field="parameters",
            )
        out.append(rendered)
    return out


def _substitute(body: str, values: Mapping[str, str]) -> str:
    """``${name}`` replaced by ``values[name]``; unknown names are left as written."""
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), body)


def _claim_unstarted(session: Session, batch: Batch, now: datetime) -> None:
    """Win the right to change ``batch``, or Conflict if it has started sending."""
    result = session.execute(
        update(Batch)
        .where(Batch.id == batch.id, Batch.status.in_(NOT_STARTED))
        .values(modified_at=now)
    )
    won = cast(CursorResult[Any], result).rowcount
    session.refresh(batch)
    if not won:
        raise Conflict(
            f"batch {batch.id} is {batch.status.value}: it has started sending (or ended) "
            "and can no longer be changed"
        )


def _replace_recipients(
    session: Session,
    batch: Batch,
    destinations: Sequence[str],
    bodies: Sequence[str] | None,
    rejected: Mapping[int, str] | None = None,
) -> None:
    # Nothing was sent, queued for a worker or reported for an unstarted batch's
    # recipients, so they are rewritten whole: seq stays 0..n-1, which chunking needs.
    session.execute(delete(Recipient).where(Recipient.batch_id == batch.id))
    batch.recipient_count = insert_recipients(
        session=session,
        batch=batch,
        destinations=destinations,
        bodies=bodies,
        now=utcnow(),
        rejected=rejected,
    )


def _reschedule(session: Session, settings: Settings, batch: Batch, now: datetime) -> None:
    """Make the broker's view follow a changed send_at."""
    if batch.status == BatchStatus.QUEUED:
        follow_send_at(session=session, settings=settings, batch=batch, now=now)
    else:
        promote_if_due(session=session, settings=settings, batch=batch, now=now)


def update_batch(
    *,
    session: Session,
    settings: Settings,
    account: Account,
    batch_id: str,
    fields: Mapping[str, Any],
    to_add: Sequence[str] = (),
    to_remove: Sequence[str] = (),
) -> Batch:
    """Change an unstarted batch: ``fields`` among sender, body, send_at, expire_at,
    callback_url, options (merged); numbers added/removed; per-recipient bodies re-rendered."""
    batch = get_batch(session=session, account=account, batch_id=batch_id)
    now = utcnow()
    _claim_unstarted(session, batch, now)
    current = destinations_of(session=session, batch_ids=[batch.id])[batch.id]
    removed = set(to_remove)
    destinations = [to for to in current if to not in removed]
    destinations += [to for to in dict.fromkeys(to_add) if to not in destinations]
    if not destinations:
        raise ValidationError("the batch would have no recipients left", field="to_remove")
    if len(destinations) > settings.max_destinations:
        raise ValidationError(
            f"the batch would have more than {settings.max_destinations} recipients", field="to_add"
        )
    for name in ("sender", "body", "callback_url"):
        if name in fields:
            setattr(batch, name, fields[name])
    options = dict(batch.options)
    options.update(fields.get("options", {}))
    if "send_at" in fields or "expire_at" in fields:
        keep_expiry = not options.get("default_expiry", False) and "expire_at" not in fields
        times = window(
            send_at=fields.get("send_at", batch.send_at),
            expire_at=fields.get("expire_at", batch.expire_at if keep_expiry else None),
            now=now,
        )
        batch.send_at, batch.expire_at = times.send_at, times.expire_at
        options["default_expiry"] = times.default_expiry
    batch.options = options
    bodies = (
        None
        if options.get("type") == "mt_binary"
        else render(
            batch.body,
            destinations,
            options.get("parameters"),
            max_length=settings.max_body_length,
        )
    )
    new = fit_parts(
        NewBatch(
            sender=batch.sender,
            body=batch.body,
            destinations=destinations,
            channels=batch.channels,
            bodies=bodies,
            max_parts=options.get("max_number_of_message_parts"),
            truncate=bool(options.get("truncate_concat")),
        )
    )
    batch.body = new.body
    batch.modified_at = now
    _replace_recipients(session, batch, destinations, new.bodies)
    session.flush()
    _reschedule(session, settings, batch, now)
    return batch


def replace_batch(
    *, session: Session, settings: Settings, account: Account, batch_id: str, new: NewBatch
) -> Batch:
    """Replace every field and recipient of an unstarted batch, keeping its id."""
    batch = get_batch(session=session, account=account, batch_id=batch_id)
    now = utcnow()
    _claim_unstarted(session, batch, now)
    digest = fingerprint(new)
    new = fit_parts(new)
    times = window(send_at=new.send_at, expire_at=new.expire_at, now=now)
    batch.fingerprint = digest
    batch.sender = new.sender
    batch.body = new.body
    batch.channels = list(new.channels)
    batch.callback_url = new.callback_url
    batch.send_at, batch.expire_at = times.send_at, times.expire_at
    batch.options = {**new.options, "default_expiry": times.default_expiry}
    batch.modified_at = now
    _replace_recipients(session, batch, new.destinations, new.bodies, new.rejected)
    session.flush()
    _reschedule(session, settings, batch, now)
    return batch


def record_feedback(
    *, session: Session, account: Account, batch_id: str, recipients: Sequence[str]
) -> int:
    """The client confirms delivery: its sent recipients (all if none named) become delivered."""
    batch = get_batch(session=session, account=account, batch_id=batch_id)
    if not batch.options.get("feedback_enabled"):
        raise ValidationError("feedback_enabled was not set on this batch", field="recipients")
    now = utcnow()
    where = [Recipient.batch_id == batch.id]
    if recipients:
        where.append(Recipient.to.in_(list(recipients)))
    moved = transition_recipients(
        session=session,
        to=RecipientStatus.DELIVERED,
        current=(RecipientStatus.SENT,),
        where=where,
        at=now,
        batch=batch,
    )
    session.flush()
    return len(moved)
