"""The one small interface every provider implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    # Retry later on the same channel.
    TRANSIENT = "transient"
    # This channel cannot reach the recipient: fall back to the next one now.
    CHANNEL = "channel"
    # No channel will: the recipient fails.
    RECIPIENT = "recipient"


class Lookup(StrEnum):
    """What a provider knows of a hand-off whose outcome a lost worker never recorded."""

    ACCEPTED = "accepted"
    NOT_FOUND = "not_found"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class OutboundMessage:
    recipient_id: str
    channel: str
    to: str
    sender: str
    body: str
    # 1 for the first attempt on this channel.
    attempt: int = 1
    # A WhatsApp template to send instead of ``body`` (the batch's ``whatsapp_template``).
    template: dict[str, Any] | None = None
    # For routing per account and a carrier-side validity period (SMPP).
    account_id: str | None = None
    expire_at: datetime | None = None

    @property
    def idempotency_key(self) -> str:
        """The same for every hand-off of this recipient on this channel."""
        return f"{self.recipient_id}:{self.channel}"


@dataclass(frozen=True)
class SendResult:
    outcome: Outcome
    provider_message_id: str | None = None
    error_code: str | None = None
    error_text: str | None = None
    retry_after: float | None = None


# A receipt status: the channel could not carry a message it had accepted (WhatsApp's
# 131026 as a failed status, say). The recipient goes on to its next channel, or fails.
CHANNEL_FAILED = "channel_failed"


@dataclass(frozen=True)
class Receipt:
    """A carrier's word on a message it accepted: delivered, failed, expired, read or
    channel_failed (``CHANNEL_FAILED``)."""

    provider_message_id: str
    status: str
    error_code: str | None = None
    error_text: str | None = None
    # The carrier's time of the final state (SMPP "done date"), if it gives one.
    done_at: datetime | None = None
    # The carrier's own word for the state (SMPP stat and err, e.g. UNDELIV:034).
    carrier_status: str | None = None


class Provider(ABC):
    """Delivers messages on one or more channels."""

    name: str = "provider"
    # Hand-offs between two checks of the lease deadline: 1 unless sending is
    # in-process and instant (a network call can take its whole timeout).
    handoff_group: int = 1
    # The far side takes a repeated hand-off as the same acceptance (an idempotent
    # message id), so one a lost worker may or may not have made is simply made again.
    resend_safe: bool = False

    @abstractmethod
    def send(self, message: OutboundMessage) -> SendResult:
        """Hand one message over; never raises for a failure of the far side."""

    def send_many(self, messages: Sequence[OutboundMessage]) -> list[SendResult]:
        """Hand several over, in order (providers with a bulk API override this)."""
        return [self.send(m) for m in messages]

    def lookup(self, message: OutboundMessage) -> tuple[Lookup, str | None]:
        """Whether a hand-off of ``message`` was accepted, with the provider's id if so."""
        return (Lookup.NOT_FOUND if self.resend_safe else Lookup.UNKNOWN), None
