"""Every table, imported in one place for Alembic and for create_all in tests."""

from dispatcher.accounts.models import Account, ApiKey
from dispatcher.batches.models import Attempt, Batch, Recipient, SharedSender, StatusEvent
from dispatcher.db import Base
from dispatcher.inbound.models import InboundMessage, InboundNumber, InboundWebhook
from dispatcher.receipts.models import PendingReceipt
from dispatcher.webhooks.models import Callback, Endpoint

__all__ = [
    "Account",
    "ApiKey",
    "Attempt",
    "Base",
    "Batch",
    "Callback",
    "Endpoint",
    "InboundMessage",
    "InboundNumber",
    "InboundWebhook",
    "PendingReceipt",
    "Recipient",
    "SharedSender",
    "StatusEvent",
]
