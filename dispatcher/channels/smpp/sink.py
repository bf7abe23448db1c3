"""The connector's sink in production: receipts to a Redis list that a worker applies,
inbound messages into the database."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import redis
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.channels.base import Receipt
from dispatcher.channels.smpp import handoff
from dispatcher.channels.smpp.connector import Inbound
from dispatcher.db import transaction, utcnow
from dispatcher.inbound import service as inbound


class DatabaseSink:
    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        redis_client: redis.Redis,
        wake: Callable[[float], None] | None = None,
    ) -> None:
        self.sessions = sessions
        self.redis = redis_client
        # Asks for the receipts task now (receipts/wake.py) instead of at beat's next run.
        self.wake = wake

    def receipts(self, batch: Sequence[Receipt]) -> None:
        """Queue receipts for the workers' receipts task (``SmppProvider.due_receipts``).

        Applying them here cost the connector a third of its CPU; a worker applies them
        in one transaction per group, as it does the simulator's.
        """
        self.redis.rpush(handoff.RECEIPTS, handoff.receipts_json(list(batch)))
        if self.wake is not None:
            self.wake(time.time())

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
