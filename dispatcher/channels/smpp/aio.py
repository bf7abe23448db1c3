"""An asyncio helper shared by the connector and the local SMSC."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any


async def run_until(pump: Coroutine[Any, Any, None], stopping: asyncio.Event) -> bool:
    """Run ``pump`` until it returns or ``stopping`` is set (then cancel it); True if stopped.

    One wait for the whole run: racing every read against the stop event instead
    costs two futures and an ``asyncio.wait`` per PDU, a good share of the CPU.
    """
    task = asyncio.ensure_future(pump)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if task.done():
        task.result()  # an error in the pump is the caller's
        return False
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return True
