"""Which callback builder each API dialect uses: the one table, filled here and nowhere else."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING

from dispatcher.states import RecipientStatus
from dispatcher.webhooks import payloads, sinch
from dispatcher.webhooks.payloads import PendingCallback

if TYPE_CHECKING:
    from dispatcher.batches.events import Change
    from dispatcher.batches.models import Batch

Builder = Callable[..., list[PendingCallback]]

# Batch.dialect -> builder. A new dialect adds its line here; read-only so that
# nothing registers a builder as a side effect of being imported.
BUILDERS: Mapping[str, Builder] = MappingProxyType(
    {
        "mplus": payloads.native,
        "message": payloads.native,
        "sinch": sinch.callbacks,
    }
)


class UnknownDialect(LookupError):
    """A batch names a dialect that has no callback builder."""


def callbacks_for(
    *, batch: Batch, status: RecipientStatus, changes: Sequence[Change], at: datetime
) -> list[PendingCallback]:
    """The callbacks a change produces, in the batch's dialect (UnknownDialect if none)."""
    try:
        builder = BUILDERS[batch.dialect]
    except KeyError:
        raise UnknownDialect(f"no callback builder for dialect {batch.dialect!r}") from None
    return builder(batch=batch, status=status, changes=changes, at=at)
