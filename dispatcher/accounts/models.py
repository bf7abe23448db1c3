"""Account and API key rows."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Float, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from dispatcher.db import Base, new_id, utcnow


class Account(Base):
    __tablename__ = "accounts"

    # Also the Sinch service_plan_id and the 8x8 subAccountId in their dialects.
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    # Messages per second across every worker; None means the configured default.
    rate_limit: Mapped[float | None] = mapped_column(Float, nullable=True)
    webhook_secret: Mapped[str] = mapped_column(String(100))
    # Kept during a rotation so both signatures are sent until it is dropped.
    previous_webhook_secret: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Service plan settings (Sinch's names): used when a batch leaves them out.
    default_originator: Mapped[str | None] = mapped_column(String(64), nullable=True)
    default_callback_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    # "standard" (Standard Webhooks headers) or "sinch" (Sinch's headers beside them).
    callback_signing: Mapped[str] = mapped_column(
        String(16), default="standard", server_default="standard"
    )

    @property
    def webhook_secrets(self) -> list[str]:
        """The secrets every webhook of this account is signed with, newest first."""
        return [s for s in (self.webhook_secret, self.previous_webhook_secret) if s]


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    # The first characters of the key, shown in listings to tell keys apart.
    prefix: Mapped[str] = mapped_column(String(16))
    # SHA-256 of the whole key: keys are 256-bit random, so a slow hash adds nothing.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)
