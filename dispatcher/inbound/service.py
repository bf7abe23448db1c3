"""Inbound messages: which account owns one, storing it, its webhook, and listing them.

An MO belongs to the account its destination number is assigned to; a reply to
a shared sender ID belongs to the account that sender is sticky-assigned to
for the replying number (to none, kept unowned, if several accounts hold it).
The webhook row is written in the same transaction as the message, signed and
retried like every callback.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, insert, select
from sqlalchemy.orm import Session

from dispatcher import outbox
from dispatcher.accounts.models import Account
from dispatcher.batches.models import Batch, Recipient, SharedSender
from dispatcher.db import new_id
from dispatcher.errors import NotFound, ValidationError
from dispatcher.inbound.models import InboundMessage, InboundNumber, InboundWebhook
from dispatcher.netsafety import UnsafeURL, check_url
from dispatcher.webhooks.models import Callback
from dispatcher.webhooks.payloads import iso

DIALECTS = ("sinch", "native")
NUMBER = re.compile(r"^\+?[0-9]{1,31}$")


@dataclass(frozen=True)
class NewInbound:
    sender: str
    to: str
    body: str
    carrier: str
    connection: str
    received_at: datetime
    data_coding: int = 0


def normalise(number: str) -> str:
    """A long number in E.164 with its ``+``; short codes and sender IDs as they are."""
    digits = number.lstrip("+")
    return "+" + digits if digits.isdigit() and len(digits) > 8 else number


def owner(*, session: Session, sender: str, to: str) -> str | None:
    """The account a message from ``sender`` to ``to`` belongs to, if any."""
    number = session.get(InboundNumber, normalise(to))
    if number is not None:
        return number.account_id
    holders = session.scalars(
        select(SharedSender.account_id)
        .where(SharedSender.sender == to, SharedSender.destination == sender)
        .limit(2)
    ).all()
    # A reply cannot say which of two accounts sharing the sender it answers: giving
    # it to either (the latest, say) would let one account read the other's replies.
    return holders[0] if len(holders) == 1 else None


def payload(message: InboundMessage, dialect: str) -> dict[str, Any]:
    """The webhook body: Sinch's ``mo_text`` inbound, or the native ``message.inbound`` event."""
    if dialect == "sinch":
        return {
            "type": "mo_text",
            "id": message.id,
            "from": message.sender,
            "to": message.to,
            "body": message.body,
            "received_at": iso(message.received_at),
        }
    return {
        "type": "message.inbound",
        "messageUuid": message.id,
        "from": message.sender,
        "to": message.to,
        "body": message.body,
        "timestamp": iso(message.received_at),
    }


def store_many(
    *, session: Session, messages: Sequence[NewInbound], now: datetime
) -> list[InboundMessage]:
    """Store inbound messages and write their webhooks (published after commit)."""
    stored = []
    callbacks: list[dict[str, Any]] = []
    for m in messages:
        row = InboundMessage(
            id=new_id(),
            account_id=owner(session=session, sender=m.sender, to=m.to),
            sender=m.sender,
            to=m.to,
            body=m.body,
            carrier=m.carrier,
            connection=m.connection,
            data_coding=m.data_coding,
            received_at=m.received_at,
        )
        session.add(row)
        stored.append(row)
        hook = session.get(InboundWebhook, row.account_id) if row.account_id else None
        if hook is None or row.account_id is None:
            continue
        body = payload(row, hook.dialect)
        callbacks.append(
            {
                "id": new_id(),
                "account_id": row.account_id,
                "batch_id": None,
                "recipient_id": None,
                "event_type": body["type"],
                "url": hook.url,
                "payload": body,
                "state": "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "enqueued_at": now,
                "created_at": now,
            }
        )
    session.flush()
    if callbacks:
        session.connection().execute(insert(Callback), callbacks)
        ids = [str(c["id"]) for c in callbacks]
        outbox.defer(
            session, outbox.Message(outbox.TaskName.DELIVER_CALLBACKS, {"callback_ids": ids})
        )
    return stored


def assign_number(*, session: Session, number: str, account_id: str) -> InboundNumber:
    """Give a dedicated number to an account (moving it if another had it)."""
    if session.get(Account, account_id) is None:
        raise NotFound(f"no account {account_id}")
    # ASCII digits (str.isdigit also takes Arabic-Indic, fullwidth... that no SMSC sends),
    # few enough to be stored with their + (32 characters).
    if not NUMBER.match(number):
        raise ValidationError(
            "a number is 1 to 31 digits 0-9, optionally after '+'", field="number"
        )
    number = normalise(number)
    row = session.get(InboundNumber, number)
    if row is None:
        row = InboundNumber(number=number, account_id=account_id)
        session.add(row)
    else:
        row.account_id = account_id
    session.flush()
    return row


def set_webhook(
    *, session: Session, account_id: str, url: str, dialect: str, allow: Sequence[str]
) -> InboundWebhook:
    """Where ``account_id``'s inbound messages are posted (checked like every callback URL)."""
    if session.get(Account, account_id) is None:
        raise NotFound(f"no account {account_id}")
    if dialect not in DIALECTS:
        raise ValidationError(f"dialect must be one of {', '.join(DIALECTS)}", field="dialect")
    if len(url) > 2048:
        raise ValidationError("must be at most 2048 characters", field="url")
    try:
        check_url(url, allow=allow)
    except UnsafeURL as exc:
        raise ValidationError(str(exc), field="url") from exc
    row = session.get(InboundWebhook, account_id)
    if row is None:
        row = InboundWebhook(account_id=account_id, url=url, dialect=dialect)
        session.add(row)
    else:
        row.url, row.dialect = url, dialect
    session.flush()
    return row


def list_inbounds(
    *,
    session: Session,
    account_id: str,
    to: Sequence[str] = (),
    start: datetime | None = None,
    end: datetime | None = None,
    page: int = 0,
    page_size: int = 30,
    client_reference: str | None = None,
) -> tuple[list[InboundMessage], int]:
    """One page of an account's inbound messages, newest first, and how many match;
    with ``client_reference``, only replies to a batch that carried it."""
    where = [InboundMessage.account_id == account_id]
    if client_reference is not None:
        # First the cheap test (the sender got a message of a batch carrying the
        # reference: the account's batches, then their recipients by batch_id), so the
        # correlated lookup of the latest message runs only for those inbounds.
        carrying = select(Batch.id).where(
            Batch.account_id == account_id,
            Batch.options["client_reference"].as_string() == client_reference,
        )
        where.append(
            func.ltrim(InboundMessage.sender, "+").in_(
                select(func.ltrim(Recipient.to, "+")).where(Recipient.batch_id.in_(carrying))
            )
        )
        where.append(replied_reference() == client_reference)
    if to:
        where.append(InboundMessage.to.in_({n for t in to for n in (t, normalise(t))}))
    if start is not None:
        where.append(InboundMessage.received_at >= start)
    if end is not None:
        where.append(InboundMessage.received_at < end)
    total = session.execute(select(func.count()).select_from(InboundMessage).where(*where))
    rows = session.scalars(
        select(InboundMessage)
        .where(*where)
        .order_by(InboundMessage.received_at.desc(), InboundMessage.id)
        .offset(page * page_size)
        .limit(page_size)
    ).all()
    return list(rows), int(total.scalar_one())


def replied_reference() -> ColumnElement[str | None]:
    """The client_reference of the message an inbound replies to: the account's latest
    message sent to the inbound's sender from the number (or code) it was sent to."""
    return (
        select(Batch.options["client_reference"].as_string())
        .join(Recipient, Recipient.batch_id == Batch.id)
        .where(
            Batch.account_id == InboundMessage.account_id,
            # Numbers may be written with or without + on either side.
            func.ltrim(Batch.sender, "+") == func.ltrim(InboundMessage.to, "+"),
            func.ltrim(Recipient.to, "+") == func.ltrim(InboundMessage.sender, "+"),
            Recipient.sent_at <= InboundMessage.received_at,
        )
        .order_by(Recipient.sent_at.desc())
        .limit(1)
        .correlate(InboundMessage)
        .scalar_subquery()
    )


def get_inbound(*, session: Session, account_id: str, inbound_id: str) -> InboundMessage:
    """One inbound message of the account (another account's is not found)."""
    row = session.get(InboundMessage, inbound_id)
    if row is None or row.account_id != account_id:
        raise NotFound(f"no inbound message {inbound_id}")
    return row
