"""Sinch's callback signature, sent beside the Standard Webhooks headers when an account asks.

Sinch signs ``f"{body}.{nonce}.{timestamp}"`` with HMAC-SHA256 under the callback
secret and sends the base64 digest in ``X-Sinch-Webhook-Signature``, with the nonce
and timestamp in their own headers: the headers the Sinch SDK's
``validate_authentication_header`` checks. The secret is the account's webhook
secret string as a whole (its UTF-8 bytes are the key, as in Sinch's validator).
"""

from __future__ import annotations

import base64
import hmac
import secrets as _secrets
from collections.abc import Collection

from sqlalchemy import select
from sqlalchemy.orm import Session

from dispatcher.accounts.models import Account

__all__ = ["headers", "secrets_of", "signature"]


def signature(*, secret: str, body: bytes, nonce: str, timestamp: int) -> str:
    """The base64 HMAC-SHA256 of ``body.nonce.timestamp`` under ``secret``."""
    content = body + f".{nonce}.{timestamp}".encode()
    return base64.b64encode(hmac.digest(secret.encode(), content, "sha256")).decode()


def headers(*, secret: str, body: bytes, timestamp: int) -> dict[str, str]:
    """Sinch's four signature headers for one POST (a fresh nonce each time)."""
    nonce = _secrets.token_hex(16)
    return {
        "X-Sinch-Webhook-Signature-Nonce": nonce,
        "X-Sinch-Webhook-Signature-Timestamp": str(timestamp),
        "X-Sinch-Webhook-Signature-Algorithm": "HmacSHA256",
        "X-Sinch-Webhook-Signature": signature(
            secret=secret, body=body, nonce=nonce, timestamp=timestamp
        ),
    }


def secrets_of(session: Session, account_ids: Collection[str]) -> dict[str, str]:
    """The webhook secret of each of these accounts that asked for Sinch's headers too."""
    if not account_ids:
        return {}
    rows = session.execute(
        select(Account.id, Account.webhook_secret).where(
            Account.id.in_(list(account_ids)), Account.callback_signing == "sinch"
        )
    )
    return {account_id: secret for account_id, secret in rows}
