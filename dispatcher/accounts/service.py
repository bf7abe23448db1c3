"""Creating accounts, issuing and revoking API keys, authenticating requests."""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from dispatcher.accounts.models import Account, ApiKey
from dispatcher.db import utcnow
from dispatcher.errors import NotFound, Unauthenticated, ValidationError
from dispatcher.webhooks.sign import new_secret

KEY_PREFIX = "dsp_"


@dataclass(frozen=True)
class IssuedKey:
    """A freshly created key: the only moment its plaintext exists."""

    id: str
    account_id: str
    key: str


def hash_key(key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_account(*, session: Session, name: str, rate_limit: float | None = None) -> Account:
    """Create an account with a fresh webhook signing secret."""
    # The sender refuses a negative or NaN rate on every send: it would never send.
    if rate_limit is not None and not (math.isfinite(rate_limit) and rate_limit >= 0):
        raise ValidationError(
            f"the rate must be zero (unlimited) or more messages per second, not {rate_limit}",
            field="rate",
        )
    account = Account(name=name, rate_limit=rate_limit, webhook_secret=new_secret())
    session.add(account)
    session.flush()
    return account


def get_account(*, session: Session, account_id: str) -> Account:
    """The account, or NotFound."""
    account = session.get(Account, account_id)
    if account is None:
        raise NotFound(f"account {account_id} not found")
    return account


def create_key(*, session: Session, account_id: str) -> IssuedKey:
    """Issue a new API key for the account; only its hash is stored."""
    get_account(session=session, account_id=account_id)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(account_id=account_id, prefix=key[:12], key_hash=hash_key(key))
    session.add(row)
    session.flush()
    return IssuedKey(id=row.id, account_id=account_id, key=key)


def revoke_key(*, session: Session, key_id: str) -> ApiKey:
    """Revoke a key by its id (or its plaintext): it stops authenticating at once."""
    row = session.get(ApiKey, key_id) or session.scalar(
        select(ApiKey).where(ApiKey.key_hash == hash_key(key_id))
    )
    if row is None:
        raise NotFound("no such API key")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


def list_keys(*, session: Session, account_id: str) -> list[ApiKey]:
    """The account's keys (hashes and prefixes only)."""
    return list(session.scalars(select(ApiKey).where(ApiKey.account_id == account_id)))


def authenticate(*, session: Session, key: str | None) -> Account:
    """The account a live API key belongs to, or Unauthenticated."""
    if not key:
        raise Unauthenticated("missing API key: pass ?key= or Authorization: Bearer")
    # One query for key and account: it runs before every request's work.
    account = session.scalar(
        select(Account)
        .join(ApiKey, ApiKey.account_id == Account.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )
    if account is None:
        raise Unauthenticated("invalid or revoked API key")
    return account


def rotate_webhook_secret(*, session: Session, account_id: str) -> Account:
    """Start a rotation: a new secret signs alongside the old one until it is finished."""
    account = get_account(session=session, account_id=account_id)
    account.previous_webhook_secret = account.webhook_secret
    account.webhook_secret = new_secret()
    session.flush()
    return account


def finish_rotation(*, session: Session, account_id: str) -> Account:
    """Drop the previous webhook secret: only the new one signs from now on."""
    account = get_account(session=session, account_id=account_id)
    account.previous_webhook_secret = None
    session.flush()
    return account


SIGNING_SCHEMES = ("standard", "sinch")
_UNSET: object = object()


def set_plan(
    *,
    session: Session,
    account_id: str,
    default_originator: str | object | None = _UNSET,
    default_callback_url: str | object | None = _UNSET,
    callback_signing: str | object = _UNSET,
) -> Account:
    """Change the account's service plan settings; None clears a default."""
    account = get_account(session=session, account_id=account_id)
    if default_originator is not _UNSET:
        account.default_originator = default_originator  # type: ignore[assignment]
    if default_callback_url is not _UNSET:
        account.default_callback_url = default_callback_url  # type: ignore[assignment]
    if callback_signing is not _UNSET:
        if callback_signing not in SIGNING_SCHEMES:
            raise ValidationError(f"callback signing must be one of {', '.join(SIGNING_SCHEMES)}")
        account.callback_signing = callback_signing
    session.flush()
    return account
