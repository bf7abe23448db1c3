"""Standard Webhooks (https://www.standardwebhooks.com/) signing and verification.

Signed content is ``f"{msg_id}.{timestamp}."`` followed by the raw body bytes,
MACed with HMAC-SHA256 under the base64-decoded part of a ``whsec_`` secret.
The ``webhook-signature`` header carries one space-separated ``v1,<base64>``
entry per active secret, so receivers keep verifying during secret rotation.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import secrets as _secrets
import time
from collections.abc import Mapping, Sequence

__all__ = ["InvalidSignature", "headers", "new_secret", "sign", "verify"]

SECRET_PREFIX = "whsec_"
_SECRET_BYTES = 32
_VERSION = "v1"


class InvalidSignature(Exception):
    """The webhook signature or timestamp did not verify."""


def new_secret() -> str:
    """Return a fresh random ``whsec_``-prefixed signing secret."""
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(_SECRET_BYTES)).decode("ascii")


@functools.lru_cache(maxsize=1024)
def _secret_key(secret: str) -> bytes:
    """Decode a ``whsec_`` secret into its raw HMAC key."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"webhook secret must start with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except binascii.Error as exc:
        raise ValueError("webhook secret is not valid base64") from exc
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def _signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the base64 HMAC-SHA256 over the Standard Webhooks signed content."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    return base64.b64encode(hmac.digest(key, content, "sha256")).decode("ascii")


def sign(*, secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the ``webhook-signature`` header value, one ``v1,`` entry per secret."""
    if isinstance(secrets, str):
        # A bare string is a Sequence[str] too; iterating it would sign per character.
        raise TypeError("secrets must be a sequence of secrets, not a single string")
    if not secrets:
        raise ValueError("at least one secret is required")
    return " ".join(
        f"{_VERSION},{_signature(_secret_key(s), msg_id, timestamp, body)}" for s in secrets
    )


def headers(*, secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Return the ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` headers."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secrets=secrets, msg_id=msg_id, timestamp=timestamp, body=body),
    }


def _header(hdrs: Mapping[str, str], name: str) -> str:
    """Return header ``name`` looked up case-insensitively, or raise InvalidSignature."""
    for key, value in hdrs.items():
        if key.lower() == name:
            return value
    raise InvalidSignature(f"missing {name} header")


def verify(
    *,
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    tolerance: int = 300,
    now: int | None = None,
) -> None:
    """Raise InvalidSignature unless ``headers`` carry a fresh, valid signature for ``body``."""
    key = _secret_key(secret)
    msg_id = _header(headers, "webhook-id")
    ts_text = _header(headers, "webhook-timestamp").strip()
    sig_header = _header(headers, "webhook-signature")

    if not ts_text.isascii() or not ts_text.isdigit():
        raise InvalidSignature("invalid webhook-timestamp")
    timestamp = int(ts_text)
    current = int(time.time()) if now is None else now
    if timestamp < current - tolerance:
        raise InvalidSignature("webhook-timestamp is too old")
    if timestamp > current + tolerance:
        raise InvalidSignature("webhook-timestamp is too far in the future")

    expected = _signature(key, msg_id, timestamp, body).encode("ascii")
    for entry in sig_header.split():
        version, _, value = entry.partition(",")
        # One valid entry suffices so senders can rotate secrets without downtime.
        if version == _VERSION and hmac.compare_digest(value.encode(), expected):
            return
    raise InvalidSignature("no matching signature")
