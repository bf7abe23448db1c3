"""Callback delivery with durable retries, endpoint health, dead letters and replay.

Every state change is a conditional update, so a redelivered or duplicated
``deliver_callbacks`` task never POSTs a callback twice at the same time. Retry
times are the ``next_attempt_at`` column (the scheduler promotes them into the
broker when due), never long Celery countdowns.

While a row is ``delivering``, ``next_attempt_at`` holds the moment it was
claimed: it is the lease start that :func:`promote_due` uses to reclaim rows
whose worker died mid-POST (see :func:`delivery_lease`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Executable, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import metrics, outbox
from dispatcher.accounts.models import Account
from dispatcher.config import Settings
from dispatcher.db import transaction, utcnow
from dispatcher.errors import Conflict, NotFound, ValidationError
from dispatcher.states import CALLBACK_TRANSITIONS, CallbackState
from dispatcher.webhooks import sign
from dispatcher.webhooks.deliver import DeliveryResult, WebhookSender, next_delay
from dispatcher.webhooks.models import Callback, Endpoint

__all__ = [
    "OUTCOMES",
    "CallbackState",
    "body_of",
    "deliver",
    "delivery_lease",
    "enable_endpoint",
    "list_callbacks",
    "list_endpoints",
    "promote_due",
    "retry_callback",
]

TASK = "deliver_callbacks"
# Floor of the lease after which a 'delivering' row is presumed orphaned.
MIN_LEASE = 300.0
MAX_PAGE_SIZE = 500
_ERROR_LEN = 500  # Callback.last_error is String(500)
OUTCOMES = ("delivered", "retry", "dead", "held", "skipped", "not_due", "stale")


S = CallbackState


def _sources(new: CallbackState) -> tuple[str, ...]:
    """The states a callback may move to ``new`` from (for conditional updates)."""
    return tuple(s.value for s, nxt in CALLBACK_TRANSITIONS.items() if new in nxt)


def delivery_lease(settings: Settings) -> timedelta:
    """How long a claim lasts before promote_due presumes the worker died."""
    # One POST is bounded by the sender's timeouts (connect, status line, a few
    # capped body reads); the lease stays well above that so a slow but live
    # worker is never overtaken, and at least five minutes.
    worst = 10 * (settings.callback_connect_timeout + settings.callback_read_timeout)
    return timedelta(seconds=max(MIN_LEASE, worst))


def body_of(payload: dict[str, Any]) -> bytes:
    """The canonical JSON bytes a payload is POSTed (and signed) as."""
    # Sorted keys: PostgreSQL's JSONB reorders keys, and every retry of one
    # webhook-id must carry byte-identical content.
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode(
        "utf-8"
    )


def _unique(ids: Iterable[str]) -> list[str]:
    """The ids in order, without repeats."""
    return list(dict.fromkeys(ids))


def _chunks(items: Sequence[str], size: int) -> list[list[str]]:
    """``items`` cut into lists of at most ``size``."""
    size = max(1, size)
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _count(session: Session, statement: Executable) -> int:
    """Execute an UPDATE and return how many rows it changed."""
    return int(cast(CursorResult[Any], session.execute(statement)).rowcount)


def _error_text(result: DeliveryResult) -> str:
    """What to store as last_error for a failed attempt: the status or a short generic reason.

    last_error reaches the client (GET /callbacks ``lastError``) and the receiver
    may be an internal service, so nothing the receiver sent (body, headers) is
    ever stored: an answer is "HTTP <status>", anything else the sender's own
    reason (an exception class, "unsafe URL: ...", the total timeout).
    """
    if result.status is not None:
        return f"HTTP {result.status}"
    return (result.error or "delivery failed")[:_ERROR_LEN]


# --- delivery -------------------------------------------------------------------------


def deliver(
    *,
    factory: sessionmaker[Session],
    settings: Settings,
    sender: WebhookSender,
    callback_ids: Sequence[str],
    clock: Callable[[], datetime] = utcnow,
) -> dict[str, int]:
    """Claim, POST and record each due callback; returns counts per outcome."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for callback_id in _unique(callback_ids):
        counts[
            _deliver_one(
                factory=factory,
                settings=settings,
                sender=sender,
                callback_id=callback_id,
                clock=clock,
            )
        ] += 1
    metrics.callbacks_delivered(counts)
    return counts


def _deliver_one(
    *,
    factory: sessionmaker[Session],
    settings: Settings,
    sender: WebhookSender,
    callback_id: str,
    clock: Callable[[], datetime],
) -> str:
    """Deliver one callback; returns its outcome (one of OUTCOMES)."""
    with transaction(factory) as session:
        claim = _claim(session=session, callback_id=callback_id, now=clock())
    if isinstance(claim, str):
        return claim
    attempt, account_id, url, secrets, body = claim

    # Outside any transaction: a slow receiver must not hold a database lock.
    if secrets:
        headers = sign.headers(
            secrets=secrets, msg_id=callback_id, timestamp=int(time.time()), body=body
        )
        result = sender.post(url=url, body=body, headers=headers)
    else:
        result = DeliveryResult(False, None, "account has no webhook secret", None, "")

    with transaction(factory) as session:
        return _record(
            session=session,
            settings=settings,
            callback_id=callback_id,
            attempt=attempt,
            account_id=account_id,
            url=url,
            result=result,
            now=clock(),
        )


def _claim(
    *, session: Session, callback_id: str, now: datetime
) -> str | tuple[int, str, str, list[str], bytes]:
    """Win the right to POST a callback, or return why not (an outcome)."""
    row = session.execute(
        select(Callback.account_id, Callback.url, Callback.state, Callback.next_attempt_at).where(
            Callback.id == callback_id
        )
    ).one_or_none()
    if row is None or row.state != S.PENDING:
        return "skipped"  # unknown, or already claimed, delivered, dead or held
    if row.next_attempt_at > now:
        # An early or stale task: let the scheduler publish it again when it is due.
        session.execute(
            update(Callback)
            .where(
                Callback.id == callback_id,
                Callback.state == S.PENDING,
                Callback.next_attempt_at > now,
            )
            .values(enqueued_at=None)
        )
        return "not_due"
    endpoint = session.get(Endpoint, (row.account_id, row.url))
    if endpoint is not None and endpoint.disabled_at is not None:
        held = _count(
            session,
            update(Callback)
            .where(Callback.id == callback_id, Callback.state.in_(_sources(S.HELD)))
            .values(state=S.HELD, enqueued_at=None),
        )
        return "held" if held else "skipped"
    claimed = session.execute(
        update(Callback)
        .where(
            Callback.id == callback_id,
            Callback.state.in_(_sources(S.DELIVERING)),
            Callback.next_attempt_at <= now,
        )
        # next_attempt_at doubles as the claim time while delivering (the lease start).
        .values(state=S.DELIVERING, attempts=Callback.attempts + 1, next_attempt_at=now)
        .returning(Callback.attempts, Callback.payload)
    ).one_or_none()
    if claimed is None:
        return "skipped"  # another worker won the claim
    account = session.get(Account, row.account_id)
    secrets = account.webhook_secrets if account is not None else []
    return claimed.attempts, row.account_id, row.url, secrets, body_of(claimed.payload)


def _record(
    *,
    session: Session,
    settings: Settings,
    callback_id: str,
    attempt: int,
    account_id: str,
    url: str,
    result: DeliveryResult,
    now: datetime,
) -> str:
    """Store the outcome of one attempt and update the endpoint's health."""
    # Matching the attempt number: if our lease was reclaimed and the callback
    # claimed again, that newer attempt owns the row and this result is dropped.
    ours = (
        Callback.id == callback_id,
        Callback.state == S.DELIVERING,
        Callback.attempts == attempt,
    )
    if result.ok:
        done = _count(
            session,
            update(Callback)
            .where(*ours)
            .values(
                state=S.DELIVERED,
                delivered_at=now,
                last_status=result.status,
                last_error=None,
                enqueued_at=None,
            ),
        )
        session.execute(
            update(Endpoint)
            .where(
                Endpoint.account_id == account_id,
                Endpoint.url == url,
                Endpoint.failing_since.is_not(None),
            )
            .values(failing_since=None)
        )
        return "delivered" if done else "stale"

    delay = next_delay(
        attempt=attempt,
        schedule=settings.callback_retry_schedule,
        retry_after=result.retry_after,
    )
    if delay is None:
        values: dict[str, Any] = {"state": S.DEAD}
        outcome = "dead"
    else:
        values = {
            "state": S.PENDING,
            "next_attempt_at": now + timedelta(seconds=delay),
            # The scheduler publishes it when due: a durable timer, not a countdown.
            "enqueued_at": None,
        }
        outcome = "retry"
    moved = _count(
        session,
        update(Callback)
        .where(*ours)
        .values(last_status=result.status, last_error=_error_text(result), **values),
    )
    if not moved:
        return "stale"
    if _endpoint_failed(
        session=session, settings=settings, account_id=account_id, url=url, now=now
    ):
        held = _hold_pending(session=session, account_id=account_id, url=url)
        if outcome == "retry" and callback_id in held:
            outcome = "held"
    return outcome


def _endpoint(*, session: Session, account_id: str, url: str) -> Endpoint:
    """The endpoint row for account+url, created (race-safely) if missing."""
    endpoint = session.get(Endpoint, (account_id, url), with_for_update=True)
    if endpoint is not None:
        return endpoint
    try:
        with session.begin_nested():
            session.add(Endpoint(account_id=account_id, url=url))
    except IntegrityError:
        pass  # another worker created it first
    endpoint = session.get(
        Endpoint, (account_id, url), with_for_update=True, populate_existing=True
    )
    assert endpoint is not None
    return endpoint


def _endpoint_failed(
    *, session: Session, settings: Settings, account_id: str, url: str, now: datetime
) -> bool:
    """Note a failed attempt on the endpoint; returns True if it is (now) disabled."""
    endpoint = _endpoint(session=session, account_id=account_id, url=url)
    if endpoint.disabled_at is not None:
        return True
    if endpoint.failing_since is None:
        endpoint.failing_since = now
    elif now - endpoint.failing_since > timedelta(seconds=settings.callback_disable_after):
        endpoint.disabled_at = now
    session.flush()
    return endpoint.disabled_at is not None


def _hold_pending(*, session: Session, account_id: str, url: str) -> set[str]:
    """Move the endpoint's pending callbacks to held; returns their ids."""
    rows = (
        session.execute(
            update(Callback)
            .where(
                Callback.account_id == account_id,
                Callback.url == url,
                Callback.state.in_(_sources(S.HELD)),
            )
            .values(state=S.HELD, enqueued_at=None)
            .returning(Callback.id)
            .execution_options(synchronize_session=False)
        )
        .scalars()
        .all()
    )
    return set(rows)


# --- scheduling -----------------------------------------------------------------------


def promote_due(*, session: Session, settings: Settings, now: datetime, limit: int = 5000) -> int:
    """Reclaim orphaned claims, then publish callbacks due within the horizon (or lost)."""
    _reclaim_stale(session=session, settings=settings, now=now)
    horizon = now + timedelta(seconds=settings.schedule_horizon)
    lost = now - timedelta(seconds=settings.callback_requeue_after)
    rows = session.execute(
        select(Callback.id, Callback.next_attempt_at)
        .where(
            Callback.state == S.PENDING,
            Callback.next_attempt_at <= horizon,
            (Callback.enqueued_at.is_(None)) | (Callback.enqueued_at < lost),
        )
        .order_by(Callback.next_attempt_at, Callback.created_at)
        .limit(limit)
    ).all()
    if not rows:
        return 0
    for ids in _chunks([r.id for r in rows], 500):
        session.execute(
            update(Callback)
            .where(Callback.id.in_(ids))
            .values(enqueued_at=now)
            .execution_options(synchronize_session=False)
        )
    due = [r.id for r in rows if r.next_attempt_at <= now]
    for ids in _chunks(due, settings.callback_batch_size):
        outbox.defer(session, outbox.Message(TASK, {"callback_ids": ids}))
    # Future retries share one task per whole second: the ETA is the second rounded
    # up, so every callback in the group is due by the time the task runs.
    later: dict[datetime, list[str]] = {}
    for r in rows:
        if r.next_attempt_at > now:
            later.setdefault(_ceil_second(r.next_attempt_at), []).append(r.id)
    for eta, group in later.items():
        for ids in _chunks(group, settings.callback_batch_size):
            outbox.defer(session, outbox.Message(TASK, {"callback_ids": ids}, eta=eta))
    session.flush()
    return len(rows)


def _ceil_second(at: datetime) -> datetime:
    """``at`` rounded up to a whole second."""
    whole = at.replace(microsecond=0)
    return whole if whole == at else whole + timedelta(seconds=1)


def _reclaim_stale(*, session: Session, settings: Settings, now: datetime) -> int:
    """Return 'delivering' rows past their lease to pending (or dead once out of retries)."""
    cutoff = now - delivery_lease(settings)
    stale = (
        Callback.state == S.DELIVERING,
        Callback.next_attempt_at < cutoff,
    )
    error = "worker lost during delivery; the receiver may have seen this webhook-id"
    # A callback that keeps killing its worker must still run out of attempts.
    out_of_tries = Callback.attempts > len(settings.callback_retry_schedule)
    dead = _count(
        session,
        update(Callback)
        .where(*stale, out_of_tries)
        .values(state=S.DEAD, last_error=error)
        .execution_options(synchronize_session=False),
    )
    retried = _count(
        session,
        update(Callback)
        .where(*stale)
        .values(state=S.PENDING, next_attempt_at=now, enqueued_at=None, last_error=error)
        .execution_options(synchronize_session=False),
    )
    return dead + retried


# --- dead letters, replay, endpoints (API and CLI) -------------------------------------


def list_callbacks(
    *,
    session: Session,
    account_id: str,
    state: str | None = None,
    page: int = 1,
    page_size: int = 50,
) -> tuple[list[Callback], int]:
    """One page of the account's callbacks, newest first, and the total count."""
    if page < 1:
        raise ValidationError("page must be at least 1", field="page")
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValidationError(f"page_size must be 1..{MAX_PAGE_SIZE}", field="page_size")
    where = [Callback.account_id == account_id]
    if state is not None:
        allowed = [s.value for s in CallbackState]
        if state not in allowed:
            raise ValidationError(f"state must be one of: {', '.join(allowed)}", field="state")
        where.append(Callback.state == state)
    total = session.scalar(select(func.count()).select_from(Callback).where(*where)) or 0
    rows = session.scalars(
        select(Callback)
        .where(*where)
        .order_by(Callback.created_at.desc(), Callback.id)
        .offset((page - 1) * page_size)
        .limit(page_size)
    ).all()
    return list(rows), int(total)


def retry_callback(
    *, session: Session, account_id: str, callback_id: str, now: datetime
) -> Callback:
    """Replay a dead or held callback now (a failed replay goes straight back to dead)."""
    callback = session.scalar(
        select(Callback)
        .where(Callback.id == callback_id, Callback.account_id == account_id)
        .with_for_update()
    )
    if callback is None:
        raise NotFound(f"callback {callback_id} not found")
    if callback.state not in (S.DEAD, S.HELD):
        raise Conflict(
            f"callback {callback_id} is {callback.state}: only dead or held "
            "callbacks can be retried"
        )
    # attempts is kept: the schedule is spent, so the replay is a single attempt.
    callback.state = S.PENDING
    callback.next_attempt_at = now
    callback.enqueued_at = now
    session.flush()
    outbox.defer(session, outbox.Message(TASK, {"callback_ids": [callback.id]}))
    return callback


def enable_endpoint(
    *, session: Session, account_id: str, url: str, now: datetime, batch_size: int = 100
) -> int:
    """Re-enable a disabled endpoint and release its held callbacks; returns how many."""
    endpoint = session.get(Endpoint, (account_id, url), with_for_update=True)
    if endpoint is None:
        raise NotFound("no such callback endpoint")
    endpoint.disabled_at = None
    endpoint.failing_since = None
    released = (
        session.execute(
            update(Callback)
            .where(Callback.account_id == account_id, Callback.url == url, Callback.state == S.HELD)
            .values(state=S.PENDING, next_attempt_at=now, enqueued_at=now)
            .returning(Callback.id)
            .execution_options(synchronize_session=False)
        )
        .scalars()
        .all()
    )
    ids = sorted(released)
    for chunk in _chunks(ids, batch_size):
        outbox.defer(session, outbox.Message(TASK, {"callback_ids": chunk}))
    session.flush()
    return len(ids)


def list_endpoints(*, session: Session, account_id: str) -> list[Endpoint]:
    """The account's callback endpoints with their health, by URL."""
    return list(
        session.scalars(
            select(Endpoint).where(Endpoint.account_id == account_id).order_by(Endpoint.url)
        )
    )
