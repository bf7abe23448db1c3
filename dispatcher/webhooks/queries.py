"""What the API and the CLI ask of callbacks: list them, replay dead or held ones, see
endpoints and re-enable a disabled one."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from dispatcher.errors import Conflict, NotFound, ValidationError
from dispatcher.states import CallbackState
from dispatcher.webhooks import scheduling
from dispatcher.webhooks.models import Callback, Endpoint

__all__ = [
    "MAX_PAGE_SIZE",
    "CallbackState",
    "enable_endpoint",
    "list_callbacks",
    "list_endpoints",
    "retry_callback",
]

MAX_PAGE_SIZE = 500

S = CallbackState


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
    scheduling.publish(session, [callback.id], size=1)
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
    scheduling.publish(session, ids, size=batch_size)
    session.flush()
    return len(ids)


def list_endpoints(*, session: Session, account_id: str) -> list[Endpoint]:
    """The account's callback endpoints with their health, by URL."""
    return list(
        session.scalars(
            select(Endpoint).where(Endpoint.account_id == account_id).order_by(Endpoint.url)
        )
    )
