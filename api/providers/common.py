"""What the vendor webhooks share: a configured secret, and the receipts entry point."""

from __future__ import annotations

from collections.abc import Sequence

from api import context as ctx
from dispatcher.channels import errors
from dispatcher.channels.base import Receipt
from dispatcher.db import utcnow
from dispatcher.errors import NotFound, Unauthenticated
from dispatcher.receipts import service as receipts


def secret(value: str, provider: str) -> str:
    """The provider's webhook secret; a provider without one has no webhook here."""
    if not value:
        raise NotFound(f"no status webhook for provider {provider!r}")
    return value


def refuse(provider: str, *, check: str, what: str = "webhook signature") -> Unauthenticated:
    """The one answer to a bad or missing signature (nothing is read or written).

    The operator hears of it (once a minute per provider): a wrong secret, or for
    Twilio a wrong public URL, leaves every message ``sent`` until the receipt
    deadline, and the 401 alone shows only in the access log.
    """
    errors.warn_operator(
        provider,
        "webhook",
        f"refused a status webhook with a missing or wrong {what}; if the vendor's"
        f" statuses are not arriving, check {check}.",
    )
    return Unauthenticated(f"missing or wrong {provider} {what}")


def record(*, provider: str, items: Sequence[Receipt]) -> dict[str, int]:
    """Apply the receipts, or keep those whose send is not recorded yet; committed before the reply.

    ``provider`` is the provider's ``name`` (what ``recipients.provider`` holds), so
    a vendor's message id matches only the messages that vendor carried.
    """
    accepted = receipts.accept(
        session=ctx.session(), provider=provider, receipts=items, now=utcnow()
    )
    return accepted.as_dict()
