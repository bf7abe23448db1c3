"""The connector's sink in production: receipts and inbound messages into the database."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session, sessionmaker

from dispatcher.channels.base import Receipt
from dispatcher.channels.smpp.connector import Inbound
from dispatcher.db import transaction, utcnow
from dispatcher.inbound import service as inbound
from dispatcher.receipts import service as receipts

# Receipts match messages by (provider, id): the name SmppProvider records them under.
PROVIDER = "smpp"


class DatabaseSink:
    def __init__(self, *, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def receipts(self, batch: Sequence[Receipt]) -> None:
        """Apply each receipt, or keep it until its message's outcome is recorded."""
        with transaction(self.sessions) as session:
            receipts.accept(session=session, provider=PROVIDER, receipts=batch, now=utcnow())

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
