"""The connector's sink in production: receipts and inbound messages into the database."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session, sessionmaker

from dispatcher.channels.base import Receipt
from dispatcher.channels.smpp.connector import Inbound
from dispatcher.db import transaction, utcnow
from dispatcher.inbound import service as inbound
from dispatcher.receipts import service as receipts


class DatabaseSink:
    def __init__(self, *, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def receipts(self, batch: Sequence[Receipt]) -> list[bool]:
        """Apply each receipt through the receipts service, in one transaction."""
        now = utcnow()
        with transaction(self.sessions) as session:
            # One call per receipt: the connector tries again, later, those that
            # matched no sent message yet (their submit's outcome not yet recorded).
            return [receipts.apply_many(session=session, receipts=[r], now=now) > 0 for r in batch]

    def inbound(self, batch: Sequence[Inbound]) -> None:
        """Store inbound messages and their webhooks, in one transaction."""
        with transaction(self.sessions) as session:
            inbound.store_many(
                session=session,
                messages=[
                    inbound.NewInbound(
                        sender=m.sender,
                        to=m.to,
                        body=m.body,
                        carrier=m.carrier,
                        connection=m.connection,
                        received_at=m.received_at,
                        data_coding=m.data_coding,
                    )
                    for m in batch
                ],
                now=utcnow(),
            )
