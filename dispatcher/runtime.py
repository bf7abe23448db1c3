"""The wiring one process needs: engine, sessions, Redis, limiter, providers.

Built lazily and per process (after a worker forks), from Settings and a
publisher; no Flask or Celery here, so the API and the workers share it.
"""

from __future__ import annotations

from functools import cached_property

import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import outbox
from dispatcher.channels.base import Provider
from dispatcher.config import Settings
from dispatcher.db import make_engine, make_session_factory
from dispatcher.engine.backpressure import CallbackBackpressure
from dispatcher.ratelimit import RateLimiter
from dispatcher.receipts.wake import ReceiptWaker
from dispatcher.webhooks.deliver import WebhookSender


class Runtime:
    def __init__(self, settings: Settings, publisher: outbox.Publisher) -> None:
        self.settings = settings
        self.publisher = publisher

    @cached_property
    def engine(self) -> Engine:
        """The database engine."""
        return make_engine(self.settings.database_url, write_gate=self.settings.sqlite_write_gate)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        """Session factory whose commits publish their deferred tasks."""
        factory = make_session_factory(self.engine)
        outbox.install(factory, self.publisher)
        return factory

    @cached_property
    def redis(self) -> redis.Redis:
        """Redis for the rate limiter and the simulator's ledger (not the broker)."""
        return redis.Redis.from_url(
            self.settings.redis_url, socket_timeout=10, socket_connect_timeout=5
        )

    @cached_property
    def limiter(self) -> RateLimiter:
        """The global rate limiter shared by every worker."""
        return RateLimiter(self.redis, max_wait=self.settings.rate_max_wait)

    @cached_property
    def backpressure(self) -> CallbackBackpressure:
        """The callbacks queue as this process's send tasks see it (see engine/backpressure.py)."""
        return CallbackBackpressure(self.redis, limit=self.settings.callback_backpressure)

    @cached_property
    def receipt_waker(self) -> ReceiptWaker:
        """Asks for the receipts task when held receipts are due (see receipts/wake.py)."""
        return ReceiptWaker(self.redis, self.publisher)

    @cached_property
    def providers(self) -> dict[str, Provider]:
        """The provider delivering each configured channel (one instance per provider name)."""
        from dispatcher.channels import registry

        built: dict[str, Provider] = {}
        out: dict[str, Provider] = {}
        for channel in self.settings.channels:
            name = self.settings.channel_providers.get(channel, self.settings.provider)
            if name not in built:
                built[name] = registry.build(
                    name,
                    settings=self.settings,
                    redis_client=self.redis,
                    wake=self.receipt_waker.at,
                )
            out[channel] = built[name]
        return out

    @cached_property
    def webhook_sender(self) -> WebhookSender:
        """The one HTTP client webhooks go out through (timeouts, caps, SSRF checks)."""
        return WebhookSender(
            connect_timeout=self.settings.callback_connect_timeout,
            read_timeout=self.settings.callback_read_timeout,
            max_response_bytes=self.settings.callback_max_response_bytes,
            allow=self.settings.callback_allowlist,
            resolve_timeout=self.settings.callback_resolve_timeout,
        )

    def dispose(self) -> None:
        """Close pools (after fork, or at shutdown)."""
        if "engine" in self.__dict__:
            self.engine.dispose()
        if "redis" in self.__dict__:
            self.redis.close()

    def reset_after_fork(self) -> None:
        """Forget every connection and client built so far: a forked child builds its own."""
        # The parent's engine is only dropped, never disposed: its pooled connections
        # belong to the parent (SQLAlchemy's advice for forked processes).
        if "engine" in self.__dict__:
            self.engine.dispose(close=False)
        for name, attribute in vars(type(self)).items():
            if isinstance(attribute, cached_property):
                self.__dict__.pop(name, None)
