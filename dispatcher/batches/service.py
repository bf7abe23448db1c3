"""Intake, reads and cancel of batches: plain functions over a session the caller owns."""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, case, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dispatcher import outbox
from dispatcher.accounts.models import Account
from dispatcher.batches import events
from dispatcher.batches.models import Batch, Recipient, SharedSender
from dispatcher.batches.transitions import transition_batch, transition_recipients
from dispatcher.config import Settings
from dispatcher.db import insert_many, new_ids, utcnow
from dispatcher.errors import Conflict, NotFound, ValidationError
from dispatcher.sms import parts
from dispatcher.sms.parts import PartInfo
from dispatcher.states import OPEN_BATCH, BatchStatus, RecipientStatus, check_batch


@dataclass(frozen=True)
class NewBatch:
    """A validated, normalised batch request, whatever dialect it came in."""

    sender: str
    body: str
    destinations: Sequence[str]
    channels: Sequence[str]
    callback_url: str | None = None
    send_at: datetime | None = None
    expire_at: datetime | None = None
    client_id: str | None = None
    dialect: str = "mplus"
    options: dict[str, Any] = field(default_factory=dict)
    # Per-destination bodies (Sinch parameters); None means every recipient gets ``body``.
    bodies: Sequence[str] | None = None
    client_message_id: str | None = None
    # SMS part limit (Messaging Plus allowMulti=false is 1; Sinch max_number_of_message_parts).
    max_parts: int | None = None
    # Cut bodies to max_parts instead of refusing them (Sinch truncate_concat).
    truncate: bool = False
    # Destination index -> error code: recipients refused at intake (written as
    # rejected, with their callbacks) while the rest of the batch goes on, as Sinch does.
    rejected: Mapping[int, str] | None = None


@dataclass(frozen=True)
class Intake:
    """The outcome of an intake: the batch, and whether this call created it."""

    batch: Batch
    created: bool


@dataclass(frozen=True)
class DryRun:
    """What a batch would be, without writing it."""

    recipients: int
    parts: int
    encoding: str
    per_recipient: list[tuple[str, str, PartInfo]]


def fit_parts(new: NewBatch) -> NewBatch:
    """Apply the SMS part limit: truncate, or refuse with a clear error."""
    if new.max_parts is None or "sms" not in new.channels:
        return new
    bodies = list(new.bodies) if new.bodies is not None else None
    infos = [parts.analyse(b) for b in (bodies or [new.body])]
    if all(info.parts <= new.max_parts for info in infos):
        return new
    if not new.truncate:
        worst = max(info.parts for info in infos)
        # Messaging Plus sets the limit from allowMulti: name the switch that lifts it.
        hint = " (allowMulti=true in the query allows more)" if new.dialect == "mplus" else ""
        raise ValidationError(
            f"needs {worst} SMS parts; at most {new.max_parts} allowed{hint}", field="message"
        )
    cut = parts.truncate(new.body, max_parts=new.max_parts)
    if bodies is not None:
        bodies = [parts.truncate(b, max_parts=new.max_parts) for b in bodies]
    return replace(new, body=cut, bodies=bodies)


def fingerprint(new: NewBatch) -> str:
    """A stable digest of the request, to tell an idempotent retry from a conflicting reuse."""
    # Shallow: asdict() deep-copies every destination, and the JSON text is the same.
    data = {f.name: getattr(new, f.name) for f in fields(new)}
    data["destinations"] = list(new.destinations)
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def analyse(new: NewBatch) -> DryRun:
    """Part counts and encodings per recipient (dry runs and the part limits)."""
    bodies = new.bodies or [new.body] * len(new.destinations)
    per = [
        (to, body, parts.analyse(body)) for to, body in zip(new.destinations, bodies, strict=True)
    ]
    encodings = {info.encoding for _, _, info in per}
    return DryRun(
        recipients=len(per),
        parts=sum(info.parts for _, _, info in per),
        encoding=str(
            parts.Encoding.UCS2 if parts.Encoding.UCS2 in encodings else parts.Encoding.GSM7
        ),
        per_recipient=per,
    )


def _existing(session: Session, account: Account, client_id: str) -> Batch | None:
    """The account's batch this client id names: by client id, or by our id, since a
    lookup takes either (a client id equal to another batch's id would name two)."""
    return session.scalar(
        select(Batch)
        .where(
            Batch.account_id == account.id,
            or_(Batch.client_id == client_id, Batch.id == client_id),
        )
        .order_by(case((Batch.client_id == client_id, 0), else_=1))  # its own first
        .limit(1)
    )


def _batch_id_for(session: Session, client_id: str | None) -> str:
    # A client's UUID becomes the batch id when free, so its own id works in URLs;
    # if another tenant holds it, a fresh id is used (lookups accept client ids too).
    if client_id:
        try:
            candidate = str(uuid.UUID(client_id))
        except ValueError:
            candidate = None
        if candidate and session.get(Batch, candidate) is None:
            return candidate
    return str(uuid.uuid4())


def _add_claiming_client_id(
    *, session: Session, account: Account, batch: Batch, client_id: str
) -> Batch | None:
    """Write ``batch``, whose client id another request may be writing at the same time;
    returns the batch that request wrote if it is the same one (an idempotent retry)."""
    try:
        with session.begin_nested():
            session.add(batch)
            session.flush()
    except IntegrityError:
        # A concurrent request won the race for this client id (or, rarely, for
        # the batch id chosen from another tenant's UUID): settle it like a retry.
        existing = _existing(session, account, client_id)
        if existing is None:
            batch.id = str(uuid.uuid4())
            session.add(batch)
            session.flush()
        elif existing.fingerprint == batch.fingerprint:
            return existing
        else:
            raise Conflict(
                f"id {client_id!r} was already used for a different batch", field="id"
            ) from None
    return None


def create_batch(
    *, session: Session, settings: Settings, account: Account, new: NewBatch
) -> Intake:
    """Write a batch and one row per recipient; publish its dispatch after commit if due soon."""
    digest = fingerprint(new)
    new = fit_parts(new)
    if new.client_id:
        existing = _existing(session, account, new.client_id)
        if existing is not None:
            if existing.fingerprint != digest:
                raise Conflict(
                    f"id {new.client_id!r} was already used for a different batch", field="id"
                )
            return Intake(batch=existing, created=False)
    now = utcnow()
    send_at = max(new.send_at or now, now)
    try:
        expire_at = new.expire_at or send_at + timedelta(seconds=settings.default_expiry)
    except OverflowError:
        raise ValidationError("send_at is too far in the future", field="send_at") from None
    if expire_at <= send_at:
        raise ValidationError("expire_at must be after send_at", field="expire_at")
    batch = Batch(
        id=_batch_id_for(session, new.client_id),
        account_id=account.id,
        client_id=new.client_id,
        fingerprint=digest,
        dialect=new.dialect,
        sender=new.sender,
        body=new.body,
        channels=list(new.channels),
        callback_url=new.callback_url,
        status=BatchStatus.SCHEDULED,
        send_at=send_at,
        expire_at=expire_at,
        recipient_count=len(new.destinations),
        options=dict(new.options),
        created_at=now,
        modified_at=now,
    )
    # Everything that needs no database is done before the first write: on SQLite the
    # write lock is held from it to the commit, and sending waits for it meanwhile.
    ids = new_ids(len(new.destinations))
    if new.client_id is None:
        # A fresh uuid4 cannot collide, so no savepoint; promoted before it is written,
        # the batch is one INSERT rather than an INSERT and an UPDATE.
        promote_if_due(session=session, settings=settings, batch=batch, now=now)
        session.add(batch)
        session.flush()
    else:
        settled = _add_claiming_client_id(
            session=session, account=account, batch=batch, client_id=new.client_id
        )
        if settled is not None:
            return Intake(batch=settled, created=False)
    insert_recipients(
        session=session,
        batch=batch,
        destinations=new.destinations,
        bodies=new.bodies,
        client_id=new.client_message_id,
        now=now,
        rejected=new.rejected,
        ids=ids,
    )
    if new.client_id is not None:
        promote_if_due(session=session, settings=settings, batch=batch, now=now)
    return Intake(batch=batch, created=True)


def insert_recipients(
    *,
    session: Session,
    batch: Batch,
    destinations: Sequence[str],
    bodies: Sequence[str] | None,
    now: datetime,
    client_id: str | None = None,
    rejected: Mapping[int, str] | None = None,
    reported: Collection[int] = (),
    ids: Sequence[str] | None = None,
) -> int:
    """Write one ``scheduled`` row per destination, seq 0..n-1 (chunks are seq ranges);
    those in ``rejected`` are written ``rejected`` with their error code, and reported
    (unless in ``reported``: an update keeps a rejection it reported before). ``ids``:
    the rows' ids if made already (default: fresh ones)."""
    refused = rejected or {}
    count = len(destinations)
    ids = new_ids(count) if ids is None else ids
    rows: dict[str, Sequence[Any]] = {"id": ids, "seq": range(count), "to": destinations}
    same: dict[str, Any] = {
        "batch_id": batch.id,
        "account_id": batch.account_id,
        # Stored only where it differs from the batch's (Sinch parameters).
        "body": None,
        "client_id": client_id,
        "status": RecipientStatus.SCHEDULED,
        "error_code": None,
        "channel_index": 0,
        "channel": batch.channels[0],
        "parts": (
            parts.binary_parts(batch.body, udh=batch.options["udh"])
            if batch.options.get("type") == "mt_binary"
            else parts.analyse(batch.body).parts
        ),
        "created_at": now,
        "updated_at": now,
    }
    if bodies is not None:
        rows["body"] = [body if body != batch.body else None for body in bodies]
        rows["parts"] = [parts.analyse(body).parts for body in bodies]
    if refused:
        rows["status"] = [
            RecipientStatus.REJECTED if seq in refused else RecipientStatus.SCHEDULED
            for seq in range(count)
        ]
        rows["error_code"] = [refused.get(seq) for seq in range(count)]
    table = Recipient.__table__
    assert isinstance(table, Table)
    insert_many(
        session,
        table,
        rows=rows,
        same={key: value for key, value in same.items() if key not in rows},
    )
    if refused:
        # Their first and final status: an event and callbacks like any other change.
        changes = [
            events.Change(ids[seq], destinations[seq], batch.channels[0], client_id, code)
            for seq, code in sorted(refused.items())
            if seq not in reported
        ]
        if changes:
            events.record(
                session=session,
                batch=batch,
                status=RecipientStatus.REJECTED,
                changes=changes,
                at=now,
            )
    return count


def promote_if_due(*, session: Session, settings: Settings, batch: Batch, now: datetime) -> bool:
    """Hand a batch due within the horizon to the broker (as an ETA task) after commit."""
    if batch.status != BatchStatus.SCHEDULED:
        return False
    if batch.send_at > now + timedelta(seconds=settings.schedule_horizon):
        return False
    batch.status = check_batch(batch.status, BatchStatus.QUEUED)
    batch.enqueued_at = now
    session.flush()
    outbox.defer(
        session,
        outbox.Message(outbox.TaskName.DISPATCH_BATCH, {"batch_id": batch.id}, eta=batch.send_at),
    )
    return True


def follow_send_at(*, session: Session, settings: Settings, batch: Batch, now: datetime) -> None:
    """A queued batch whose send_at moved: back to the database if beyond the horizon, else
    a dispatch task at the new time (an older task finds nothing to do: dispatch re-checks)."""
    if batch.send_at > now + timedelta(seconds=settings.schedule_horizon):
        batch.status = check_batch(batch.status, BatchStatus.SCHEDULED)
        batch.enqueued_at = None
    else:
        batch.enqueued_at = now
        outbox.defer(
            session,
            outbox.Message(
                outbox.TaskName.DISPATCH_BATCH, {"batch_id": batch.id}, eta=batch.send_at
            ),
        )
    session.flush()


def assign_shared_sender(
    *,
    session: Session,
    settings: Settings,
    account: Account,
    destination: str,
    dry_run: bool = False,
) -> str:
    """The shared sender ID for this destination: the one used before, else a random one.

    A dry run reports the sticky sender if there is one and records nothing.
    """
    sticky = session.get(SharedSender, (account.id, destination))
    if sticky is not None and sticky.sender in settings.shared_senders:
        return sticky.sender
    if not settings.shared_senders:
        raise ValidationError("no shared sender IDs are configured", field="from.type")
    sender = random.choice(settings.shared_senders)
    if dry_run:
        return sender
    if sticky is None:
        session.add(SharedSender(account_id=account.id, destination=destination, sender=sender))
    else:
        sticky.sender = sender
    session.flush()
    return sender


@dataclass(frozen=True)
class NewMessage:
    """One entry of a Messaging Plus /message request: a batch of one recipient."""

    to: str
    body: str
    sender: str | None
    shared_sender: bool
    channels: Sequence[str]
    callback_url: str | None = None
    send_at: datetime | None = None
    client_id: str | None = None

    def as_batch(self, sender: str) -> NewBatch:
        """The one-recipient batch this message is, sent from ``sender``."""
        return NewBatch(
            sender=sender,
            body=self.body,
            destinations=[self.to],
            channels=self.channels,
            callback_url=self.callback_url,
            send_at=self.send_at,
            client_id=self.client_id,
            dialect="message",
            client_message_id=self.client_id,
            options={"from_type": "shared" if self.shared_sender else "custom"},
        )


def create_messages(
    *,
    session: Session,
    settings: Settings,
    account: Account,
    messages: Sequence[NewMessage],
    dry_run: bool = False,
) -> list[tuple[NewMessage, str, Batch | None]]:
    """Each message becomes its own one-recipient batch (as Messaging Plus "Add Message"
    answers); returns each message with the sender used and its batch (None in a dry run)."""
    out: list[tuple[NewMessage, str, Batch | None]] = []
    for m in messages:
        if m.shared_sender:
            sender = assign_shared_sender(
                session=session,
                settings=settings,
                account=account,
                destination=m.to,
                dry_run=dry_run,
            )
        else:
            assert m.sender is not None
            sender = m.sender
        new = m.as_batch(sender)
        if dry_run:
            fit_parts(new)
            out.append((m, sender, None))
            continue
        out.append(
            (
                m,
                sender,
                create_batch(session=session, settings=settings, account=account, new=new).batch,
            )
        )
    return out


def get_batch(*, session: Session, account: Account, batch_id: str) -> Batch:
    """The account's batch by our id or the client's; another tenant's is NotFound."""
    batch = session.scalar(
        select(Batch).where(
            Batch.account_id == account.id,
            or_(Batch.id == batch_id, Batch.client_id == batch_id),
        )
    )
    if batch is None:
        raise NotFound(f"batch {batch_id} not found")
    return batch


def status_counts(*, session: Session, batch: Batch) -> dict[str, int]:
    """How many recipients of the batch are in each state (all states, zeros included)."""
    counts: Counter[str] = Counter({s.value: 0 for s in RecipientStatus})
    rows = session.execute(
        select(Recipient.status, func.count())
        .where(Recipient.batch_id == batch.id)
        .group_by(Recipient.status)
    )
    for status, count in rows:
        counts[RecipientStatus(status).value] = count
    return dict(counts)


def list_recipients(
    *,
    session: Session,
    batch: Batch,
    page: int,
    page_size: int,
    status: str | None = None,
) -> tuple[list[Recipient], int]:
    """One page of the batch's recipients in batch order, and the total."""
    query = select(Recipient).where(Recipient.batch_id == batch.id)
    if status:
        query = query.where(Recipient.status == RecipientStatus(status))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Recipient.seq).offset(page * page_size).limit(page_size))
    return list(rows), total


def cancel_batch(
    *, session: Session, account: Account, batch_id: str, chunk_size: int | None = None
) -> tuple[Batch, int]:
    """Cancel every recipient not yet claimed; returns the batch and how many were cancelled.

    One conditional UPDATE decides it: a worker can only claim ``queued`` rows, so
    once this commits no counted recipient can be sent, whatever tasks are in flight.
    The batch row is changed first: every writer locks batch, then recipients (no
    deadlock), and a worker recording a failed hand-off afterwards sees the cancel
    and does not queue that recipient again (see engine/recording.apply).
    """
    batch = get_batch(session=session, account=account, batch_id=batch_id)
    if batch.status not in OPEN_BATCH:
        raise Conflict(f"batch {batch.id} is {batch.status.value} and cannot be cancelled")
    now = utcnow()
    moved = transition_batch(
        session=session,
        batch_id=batch.id,
        to=BatchStatus.CANCELLED,
        values={"completed_at": now},
        at=now,
    )
    if not moved:
        raise Conflict(f"batch {batch.id} changed state while cancelling; try again")
    cancelled = transition_recipients(
        session=session,
        to=RecipientStatus.CANCELLED,
        where=[Recipient.batch_id == batch.id],
        at=now,
        batch=batch,
    )
    # Dropping the batch's queued tasks only saves work: the UPDATE above decided.
    outbox.defer(
        session,
        outbox.Revoke(
            outbox.batch_task_ids(
                batch_id=batch.id, count=batch.recipient_count, chunk_size=chunk_size
            )
        ),
    )
    session.flush()
    session.refresh(batch)
    return batch, len(cancelled)


def first_recipient_id(*, session: Session, batch: Batch) -> str:
    """The id of a one-recipient batch's message (``messageUuid``)."""
    rid = session.scalar(
        select(Recipient.id).where(Recipient.batch_id == batch.id, Recipient.seq == 0)
    )
    assert rid is not None
    return rid
