"""The one small interface every provider implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    # Retry later on the same channel.
    TRANSIENT = "transient"
    # This channel cannot reach the recipient: fall back to the next one now.
    CHANNEL = "channel"
    # No channel will: the recipient fails.
    RECIPIENT = "recipient"
    # Handed over, but whether the carrier took it cannot be known (SMPP: no
    # submit_sm_resp came): final as "unknown", never sent again.
    UNKNOWN = "unknown"


class Lookup(StrEnum):
    """What a provider knows of a hand-off whose outcome a lost worker never recorded."""

    ACCEPTED = "accepted"
    NOT_FOUND = "not_found"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class SmsOptions:
    """How an SMS reaches the carrier beyond its text; providers that cannot, ignore it.

    From a Sinch batch: ``mt_binary`` (the body is base64 of 8-bit data, ``udh`` the hex
    user data header, length octet first), ``flash_message`` (class 0), ``from_ton`` and
    ``from_npi`` (the source address's type and plan). Only the smpp provider carries
    them; binary batches are refused at intake when no provider can (see registry).
    """

    udh: str | None = None
    flash: bool = False
    source_ton: int | None = None
    source_npi: int | None = None

    @classmethod
    def of_batch(cls, options: Mapping[str, Any]) -> SmsOptions | None:
        """The options a batch stored (Batch.options), or None when it set none."""
        found = cls(
            udh=options.get("udh") if options.get("type") == "mt_binary" else None,
            flash=bool(options.get("flash_message")),
            source_ton=options.get("from_ton"),
            source_npi=options.get("from_npi"),
        )
        return None if found == cls() else found


class OutboundMessage(NamedTuple):
    """One message to hand over (a named tuple: one is made per recipient sent, and a
    frozen dataclass's ``__init__`` cost a tenth of the send task)."""

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
    sms: SmsOptions | None = None

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


# A worker's claim on receipts it took from a provider's store and has not committed
# yet, once older than this, was left by a killed worker: longer than any task's hard
# time limit, so a live worker's claim is never taken from it (simulator and SMPP).
RECEIPT_CLAIM_STALE_S = 15 * 60


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

    def lookup(
        self, message: OutboundMessage, *, claimed_at: datetime | None = None
    ) -> tuple[Lookup, str | None]:
        """Whether a hand-off of ``message`` was accepted, with the provider's id if so
        (``claimed_at``: when the hand-off began, for a provider whose record can be lost)."""
        return (Lookup.NOT_FOUND if self.resend_safe else Lookup.UNKNOWN), None
