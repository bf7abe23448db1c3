"""A vendor API that stops answering is not called for every message in turn.

Without this, a carrier whose API hangs costs each message its whole timeout
(``DISPATCHER_HTTP_READ_TIMEOUT``, 10 s): a group of 20 claimed recipients holds a
send process for 200 s per retry round, and a few batches hold the whole pool,
other channels and accounts included. After ``FAILURES`` transport failures in a
row, the provider answers at once, transient with the pause as ``retry_after``,
until ``PAUSE`` seconds have passed; then one message is let through, and its
answer closes the breaker (any reply from the API) or opens it again. Per process:
each send process finds out for itself, after a few timeouts. Opening and closing
set ``dispatcher_carrier_connection_up{provider=..., connection="api"}`` to 0 and 1.
"""

from __future__ import annotations

import threading
import time
from abc import abstractmethod
from collections.abc import Callable

from dispatcher import metrics
from dispatcher.channels import errors
from dispatcher.channels.base import OutboundMessage, Outcome, Provider, SendResult

FAILURES = 3
PAUSE = 30.0


class Breaker:
    """Consecutive transport failures of one API, and the pause they impose."""

    def __init__(
        self,
        *,
        failures: int = FAILURES,
        pause: float = PAUSE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures = failures
        self.pause = pause
        self._clock = clock
        self._lock = threading.Lock()
        self._in_a_row = 0
        self._open_until = 0.0

    def refused(self) -> SendResult | None:
        """The answer for a message not handed over while paused; None: call the API."""
        with self._lock:
            left = self._open_until - self._clock()
            if self._in_a_row < self.failures or left <= 0:
                if self._in_a_row >= self.failures:
                    # The probe: until its answer is recorded, the others wait a pause.
                    self._open_until = self._clock() + self.pause
                return None
        return errors.failure(
            Outcome.TRANSIENT,
            code=errors.NETWORK,
            text=f"not sent: the API failed {self._in_a_row} times in a row; paused",
            retry_after=left,
        )

    def record(self, result: SendResult) -> bool | None:
        """Count a transport failure, or close the breaker on any answer of the API.

        True when this opened the breaker, False when it closed it, None otherwise.
        """
        with self._lock:
            was_open = self._in_a_row >= self.failures
            if result.error_code not in errors.NO_ANSWER:
                self._in_a_row = 0
                return False if was_open else None
            self._in_a_row += 1
            if self._in_a_row >= self.failures:
                self._open_until = self._clock() + self.pause
            return True if self._in_a_row == self.failures else None


class HttpVendor(Provider):
    """A vendor's HTTP API as a provider: each hand-off goes through the breaker."""

    breaker: Breaker

    def send(self, message: OutboundMessage) -> SendResult:
        refused = self.breaker.refused()
        if refused is not None:
            return refused
        result = self.hand_over(message)
        opened = self.breaker.record(result)
        if opened is not None:
            # The alert on carrier connections covers the vendors' APIs too.
            metrics.carrier_connection(provider=self.name, connection="api", up=not opened)
        return result

    @abstractmethod
    def hand_over(self, message: OutboundMessage) -> SendResult:
        """One call of the vendor's API; never raises for a failure of the far side."""
