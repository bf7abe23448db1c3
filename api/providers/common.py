"""What the vendor webhooks share: a configured secret, and the receipts entry point."""

from __future__ import annotations

from collections.abc import Sequence

from api import context as ctx
from dispatcher.channels.base import Receipt
from dispatcher.db import utcnow
from dispatcher.errors import NotFound, Unauthenticated
from dispatcher.receipts import service as receipts


def secret(value: str, provider: str) -> str:
    """The provider's webhook secret; a provider without one has no webhook here."""
    if not value:
        raise NotFound(f"no status webhook for provider {provider!r}")
    return value


def refuse(provider: str) -> Unauthenticated:
    """The one answer to a bad or missing signature (nothing is read or written)."""
    return Unauthenticated(f"missing or wrong {provider} webhook signature")


def record(*, provider: str, items: Sequence[Receipt]) -> dict[str, int]:
    """Apply (or, with durable receipts, keep) the receipts; committed before the reply."""
    applied = (
        receipts.apply_many(session=ctx.session(), receipts=items, now=utcnow()) if items else 0
    )
    return {"applied": applied, "ignored": len(items) - applied}
