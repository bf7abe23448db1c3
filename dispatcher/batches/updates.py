"""Changing batches after intake: update, replace and delivery feedback.

A batch may change only while it has not started sending (``scheduled`` or
``queued``). Each change starts with one conditional UPDATE of the batch row on
that status: it either wins (and, on PostgreSQL, holds the row until commit) or
the batch has started and the caller gets a Conflict naming why.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select, update
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
from dispatcher.sms import parts
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
    unmatched: dict[int, str],
) -> list[str] | None:
    """Per-recipient bodies with ``${name}`` replaced (recipient's value, else ``default``).

    None when there are no parameters. A recipient with a placeholder that has
    neither a value nor a default is recorded in ``unmatched`` with
    ``parameter_missing`` (Sinch fails only that message). A rendered body longer
    than ``max_length`` is a ValidationError.
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
            if value is None:
                unmatched[index] = "parameter_missing"
            else:
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


@dataclass(frozen=True)
class Fitted:
    """The batch body and per-recipient bodies (None: all get ``body``), cut to the part
    limit where ``truncate_concat`` asks, and who fails alone."""

    body: str
    bodies: list[str] | None
    # Destination index -> error code (parameter_missing, parts_limit).
    rejected: dict[int, str]


def fit_recipients(
    *,
    body: str,
    destinations: Sequence[str],
    options: Mapping[str, Any],
    max_length: int,
) -> Fitted:
    """Render parameters and apply the part limit as Sinch does on send, replace and update.

    A recipient whose parameter has no value, or whose message needs more than
    ``max_number_of_message_parts`` (without ``truncate_concat``, which cuts instead),
    fails alone; the rest of the batch goes on. ``options`` are the batch's Sinch fields.
    """
    if options.get("type") == "mt_binary":
        return Fitted(body, None, {})
    limit = options.get("max_number_of_message_parts")
    rejected: dict[int, str] = {}
    bodies = render(
        body, destinations, options.get("parameters"), max_length=max_length, unmatched=rejected
    )
    if limit is None:
        return Fitted(body, bodies, rejected)
    if options.get("truncate_concat"):
        cut = None if bodies is None else [parts.truncate(b, max_parts=limit) for b in bodies]
        return Fitted(parts.truncate(body, max_parts=limit), cut, rejected)
    for i, text in enumerate(bodies or [body]):
        if i not in rejected and parts.analyse(text).parts > limit:
            rejected[i] = "parts_limit"
    if bodies is None and rejected:  # one body for all, over the limit: all fail
        rejected = dict.fromkeys(range(len(destinations)), "parts_limit")
    return Fitted(body, bodies, rejected)


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


def _rewrite(
    session: Session,
    settings: Settings,
    batch: Batch,
    now: datetime,
    destinations: Sequence[str],
    bodies: Sequence[str] | None,
    rejected: Mapping[int, str] | None,
    reported: Collection[int] = (),
) -> Batch:
    """Write the changed batch's recipients again and make the broker follow its send_at."""
    batch.modified_at = now
    # Nothing was sent, queued for a worker or reported for an unstarted batch's
    # recipients (but rejections, which ``reported`` keeps quiet), so they are rewritten
    # whole: seq stays 0..n-1, which chunking needs.
    session.execute(delete(Recipient).where(Recipient.batch_id == batch.id))
    batch.recipient_count = insert_recipients(
        session=session,
        batch=batch,
        destinations=destinations,
        bodies=bodies,
        now=utcnow(),
        rejected=rejected,
        reported=reported,
    )
    session.flush()
    if batch.status == BatchStatus.QUEUED:
        follow_send_at(session=session, settings=settings, batch=batch, now=now)
    else:
        promote_if_due(session=session, settings=settings, batch=batch, now=now)
    return batch


def _rejections(session: Session, batch_id: str) -> dict[str, str]:
    """The batch's recipients rejected at intake, by number, with their codes."""
    rows = session.execute(
        select(Recipient.to, Recipient.error_code).where(
            Recipient.batch_id == batch_id, Recipient.status == RecipientStatus.REJECTED
        )
    )
    return {to: code or "" for to, code in rows}


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
    if batch.options.get("type") == "mt_binary":
        # Its body is base64 checked together with its udh: a text update would send garbage.
        raise ValidationError(
            "an mt_binary batch cannot be updated; replace it (PUT) instead", field="type"
        )
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
    fitted = fit_recipients(
        body=batch.body,
        destinations=destinations,
        options=options,
        max_length=settings.max_body_length,
    )
    # A rejection already reported is final: it stays, with its code and no second
    # callback, whatever the update changes; new failures are reported as on send.
    earlier = _rejections(session, batch.id)
    kept = {i: earlier[to] for i, to in enumerate(destinations) if to in earlier}
    batch.body = fitted.body
    return _rewrite(
        session,
        settings,
        batch,
        now,
        destinations,
        fitted.bodies,
        {**fitted.rejected, **kept},
        reported=kept.keys(),
    )


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
    return _rewrite(session, settings, batch, now, new.destinations, new.bodies, new.rejected)


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
