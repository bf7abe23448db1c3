"""Group and member rows."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from dispatcher.db import Base, utcnow


class Group(Base):
    __tablename__ = "sinch_groups"
    __table_args__ = (Index("ix_sinch_groups_account_id", "account_id", "created_at"),)

    # Sinch's group id form (26 Crockford base32 characters), so it never looks like a number.
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    modified_at: Mapped[datetime] = mapped_column(default=utcnow)


class GroupMember(Base):
    __tablename__ = "sinch_group_members"

    group_id: Mapped[str] = mapped_column(
        ForeignKey("sinch_groups.id", ondelete="CASCADE"), primary_key=True
    )
    msisdn: Mapped[str] = mapped_column(String(32), primary_key=True)
