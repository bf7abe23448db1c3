"""Sinch's callback signature, sent beside the Standard Webhooks headers when an account asks.

Sinch signs ``f"{body}.{nonce}.{timestamp}"`` with HMAC-SHA256 under the callback
secret and sends the base64 digest in ``X-Sinch-Webhook-Signature``, with the nonce
and timestamp in their own headers: the headers the Sinch SDK's
``validate_authentication_header`` checks. The secret is the account's webhook
secret string as a whole (its UTF-8 bytes are the key, as in Sinch's validator).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets as _secrets

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.accounts.models import Account

__all__ = ["headers", "headers_for", "signature"]


def signature(*, secret: str, body: bytes, nonce: str, timestamp: int) -> str:
    """The base64 HMAC-SHA256 of ``body.nonce.timestamp`` under ``secret``."""
    content = body + f".{nonce}.{timestamp}".encode()
    return base64.b64encode(hmac.new(secret.encode(), content, hashlib.sha256).digest()).decode()


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


def headers_for(
    *, factory: sessionmaker[Session], account_id: str, body: bytes, timestamp: int
) -> dict[str, str]:
    """Sinch's headers if the account signs the Sinch way as well, else none."""
    with factory() as session:
        row = session.execute(
            select(Account.callback_signing, Account.webhook_secret).where(Account.id == account_id)
        ).one_or_none()
    if row is None or row.callback_signing != "sinch":
        return {}
    return headers(secret=row.webhook_secret, body=body, timestamp=timestamp)
