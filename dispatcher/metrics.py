"""Prometheus metrics: the definitions, the one-line hooks services call, the scrape-time collector.

Dispatcher runs as many processes (gunicorn workers, Celery prefork pool
children), so every metric is written through prometheus-client's
multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set: each process
writes its own mmap file there and a scrape sums the files of one host.
Gauges that describe the system rather than one process (queue depth, the
age of the oldest due work, dead letters) are computed at scrape time by
:class:`BacklogCollector` from cheap indexed queries, with a short cache.

Labels are bounded: status, channel, provider, outcome, queue, route. No
batch or recipient id is ever a label; the account is one only when
``DISPATCHER_METRICS_PER_ACCOUNT`` is on (otherwise it is empty, which
Prometheus treats as absent).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import shutil
import threading
import time
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError
from sqlalchemy import event
from sqlalchemy.exc import SQLAlchemyError

from dispatcher.outbox import QueueName

if TYPE_CHECKING:
    import redis
    from sqlalchemy.orm import Session, sessionmaker

    from dispatcher.batches.events import Change
    from dispatcher.batches.models import Batch
    from dispatcher.channels.base import OutboundMessage, Provider, SendResult
    from dispatcher.config import Settings
    from dispatcher.runtime import Runtime
    from dispatcher.states import RecipientStatus

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The Celery queues Dispatcher consumes.
QUEUES = tuple(queue.value for queue in QueueName)
# kombu's Redis transport keeps priority levels 3, 6, 9 in sibling lists.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)

_LATENCY = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LAG = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)


def _latency(name: str, doc: str, labels: list[str]) -> Histogram:
    """A histogram of something that takes milliseconds to seconds (a hand-off, a request)."""
    return Histogram(name, doc, labels, buckets=_LATENCY)


RECIPIENTS = Counter(
    "dispatcher_recipients",
    "Recipients moved into a status (one per status change).",
    ["status", "channel", "account"],
)
SEND_LAG = Histogram(
    "dispatcher_send_lag_seconds",
    "From a recipient's send_at to its hand-off being recorded as sent.",
    ["channel"],
    buckets=_LAG,
)
HANDOFFS = Counter(
    "dispatcher_handoffs",
    "Messages handed to a provider, by the provider's answer.",
    ["provider", "channel", "outcome"],
)
HANDOFF_SECONDS = _latency(
    "dispatcher_handoff_seconds", "Time a provider took to take one message.", ["provider"]
)
RATE_LIMIT_WAIT = Histogram(
    "dispatcher_rate_limit_wait_seconds",
    "Time a send worker waited for rate-limit tokens.",
    buckets=(0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
)
SEND_BACKPRESSURE = Counter(
    "dispatcher_send_backpressure_seconds",
    "Time send workers waited for the callbacks queue to drain (callback_backpressure).",
)
CALLBACKS = Counter(
    "dispatcher_callbacks",
    "Callback delivery attempts by outcome (delivered, retry, dead, held, skipped...).",
    ["outcome"],
)
RECEIPTS = Counter(
    "dispatcher_receipts",
    "Delivery receipts by outcome (applied, unmatched, waiting, dropped, refused).",
    ["outcome"],
)
CARRIER_UP = Gauge(
    "dispatcher_carrier_connection_up",
    "1 while a carrier connection is bound and usable, 0 while it is down.",
    ["provider", "connection"],
    multiprocess_mode="livemax",
)
WORKERS = Gauge(
    "dispatcher_workers",
    "Celery worker nodes alive, by queue they consume.",
    ["queue"],
    multiprocess_mode="livesum",
)
HTTP_REQUESTS = Counter(
    "dispatcher_http_requests",
    "API requests by route (the URL rule, not the path), method and status.",
    ["route", "method", "status"],
)
HTTP_SECONDS = _latency(
    "dispatcher_http_request_seconds",
    "API request latency by route and method.",
    ["route", "method"],
)

_state: dict[str, Any] = {"per_account": False}
_PENDING, _HOOKED = "dispatcher.metrics.pending", "dispatcher.metrics.hooked"


def configure(settings: Settings) -> None:
    """Apply the settings that shape labels (called by the API and worker factories)."""
    _state["per_account"] = settings.metrics_per_account


def _account(account_id: str | None) -> str:
    return (account_id or "") if _state["per_account"] else ""


# --- hooks: one-line calls from the services -----------------------------------------


def status_changed(
    *,
    session: Session,
    batch: Batch,
    status: RecipientStatus,
    changes: Sequence[Change],
    at: datetime,
) -> None:
    """Count recipients entering ``status`` once the transaction commits (lag for ``sent``)."""
    counts = Tally(c.channel or "" for c in changes)
    lag = max(0.0, (at - batch.send_at).total_seconds()) if status == "sent" else None
    pending = session.info.setdefault(_PENDING, [])
    pending.append((str(status), _account(batch.account_id), counts, lag))
    if not session.info.get(_HOOKED):
        # A rolled-back change never happened: count on commit, forget on rollback.
        session.info[_HOOKED] = True
        event.listen(session, "after_commit", _flush_pending)
        event.listen(session, "after_soft_rollback", _drop_pending)


def observe_many(hist: Histogram, amount: float, n: int) -> None:
    """``hist.observe(amount)`` n times, as two increments instead of 2n (a chunk's recipients).

    prometheus_client has no weighted observe; this does what ``observe`` does
    (the sum, then the first bucket that holds the amount) with the count n.
    tests/test_metrics.py checks it against n observes, in case the library changes.
    """
    if n <= 0:
        return
    hist._raise_if_not_observable()
    hist._sum.inc(amount * n)
    hist._buckets[bisect_left(hist._upper_bounds, amount)].inc(n)


def _flush_pending(session: Session) -> None:
    for status, account, counts, lag in session.info.pop(_PENDING, []):
        for channel, n in counts.items():
            RECIPIENTS.labels(status, channel, account).inc(n)
            if lag is not None:
                observe_many(SEND_LAG.labels(channel), lag, n)


def _drop_pending(session: Session, _previous: Any) -> None:
    session.info.pop(_PENDING, None)


def hand_over(provider: Provider, messages: Sequence[OutboundMessage]) -> list[SendResult]:
    """``provider.send_many(messages)``, timed per provider and counted by outcome."""
    started = time.perf_counter()
    results = provider.send_many(messages)
    each = (time.perf_counter() - started) / max(1, len(messages))
    observe_many(HANDOFF_SECONDS.labels(provider.name), each, len(results))
    # Counted per (channel, outcome), not per message: a label lookup takes a lock.
    counts = Tally((m.channel, str(r.outcome)) for m, r in zip(messages, results, strict=False))
    for (channel, outcome), n in counts.items():
        HANDOFFS.labels(provider.name, channel, outcome).inc(n)
    return results


def rate_limit_waited(seconds: float) -> None:
    """Observe one wait for rate-limit tokens (zero included: it shows how often we wait)."""
    RATE_LIMIT_WAIT.observe(max(0.0, seconds))


def send_backpressure(seconds: float) -> None:
    """Count time a send worker waited for the callbacks queue to drain."""
    SEND_BACKPRESSURE.inc(max(0.0, seconds))


def callbacks_delivered(counts: Mapping[str, int]) -> None:
    """Count callback outcomes from one delivery run."""
    for outcome, n in counts.items():
        if n:
            CALLBACKS.labels(outcome).inc(n)


def receipts_applied(*, received: int, applied: int) -> None:
    """Count a receipt run: those that changed a recipient, and those that matched none."""
    receipts("applied", applied)
    receipts("unmatched", received - applied)


def receipts(outcome: str, n: int = 1) -> None:
    """Count receipts: ``applied``, ``unmatched``, ``waiting`` (kept for later), ``dropped``,
    ``refused`` (the database would not store it: dropped, logged)."""
    if n:
        RECEIPTS.labels(outcome).inc(n)


def carrier_connection(*, provider: str, connection: str, up: bool) -> None:
    """Set a carrier connection's state (an SMPP bind, for example)."""
    CARRIER_UP.labels(provider, connection).set(1 if up else 0)


def worker_started(queues: Iterable[str]) -> None:
    """Mark this worker node as consuming ``queues`` (its main process calls this)."""
    for queue in queues:
        WORKERS.labels(queue).set(1)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def http_request(*, route: str, method: str, status: int, seconds: float) -> None:
    """Count one API request; ``route`` is the URL rule, so ids never become labels."""
    # A client may send any method name: only the standard ones become label values.
    method = method if method in _METHODS else "other"
    HTTP_REQUESTS.labels(route, method, str(status)).inc()
    HTTP_SECONDS.labels(route, method).observe(seconds)


# --- multiprocess mode ---------------------------------------------------------------


def multiproc_dir() -> str | None:
    """The directory shared by this host's processes, or None in single-process mode."""
    return os.environ.get(MULTIPROC_ENV) or None


def prepare_multiproc_dir(path: Path) -> str:
    """Empty (or create) ``path`` for a fresh start; files of dead processes would count."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return str(path)


def multiproc_env(path: Path) -> dict[str, str]:
    """The environment that gives children one multiprocess directory (emptied here)."""
    return {MULTIPROC_ENV: prepare_multiproc_dir(path)}


def dev_token(var: Path) -> str:
    """``dispatcher run``'s /metrics token: generated once into ``var/metrics-token``."""
    path = var / "metrics-token"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(24) + "\n")
        path.chmod(0o600)
    return path.read_text().strip()


def process_exited(pid: int) -> None:
    """Drop a dead process's live gauges (gunicorn's child_exit, Celery's process shutdown)."""
    if multiproc_dir():
        multiprocess.mark_process_dead(pid)


class _ThisProcess(Collector):
    """The default registry's metrics, when there is no multiprocess directory."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def registry() -> CollectorRegistry:
    """A registry with every process's metrics on this host (or this process's)."""
    reg = CollectorRegistry(auto_describe=False)
    if multiproc_dir():
        multiprocess.MultiProcessCollector(reg)
    else:
        reg.register(_ThisProcess())
    return reg


def exposition(extra: Collector | None = None) -> tuple[bytes, str]:
    """The text a scrape returns, and its content type."""
    reg = registry()
    if extra is not None:
        reg.register(extra)
    return generate_latest(reg), CONTENT_TYPE_LATEST


def token_ok(*, expected: str, authorization: str | None) -> bool:
    """Whether an Authorization header carries the metrics bearer token."""
    if not expected or not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    # As bytes: compare_digest raises TypeError on a non-ASCII str, and headers are Latin-1.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), expected.encode()
    )


def serve_worker_metrics(*, host: str, port: int) -> None:
    """Serve this host's multiprocess metrics on ``host:port`` (a Celery worker's exporter)."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=host, registry=registry())
    log.info("worker metrics on http://%s:%d/metrics", host, port)


_backlogs: WeakKeyDictionary[Runtime, BacklogCollector] = WeakKeyDictionary()


def backlog_for(runtime: Runtime) -> BacklogCollector:
    """The runtime's backlog collector (one per process, so its cache is shared)."""
    collector = _backlogs.get(runtime)
    if collector is None:
        collector = _backlogs[runtime] = BacklogCollector(
            sessions=runtime.sessions,
            redis_client=runtime.redis,
            cache_seconds=runtime.settings.metrics_cache_seconds,
        )
    return collector


# --- scrape-time gauges --------------------------------------------------------------


def queue_lists(queue: str) -> list[str]:
    """The Redis lists kombu keeps a Celery queue in (one per priority level)."""
    return [queue, *(f"{queue}{_PRIORITY_SEP}{step}" for step in _PRIORITY_STEPS)]


def queue_depths(client: redis.Redis) -> dict[str, int]:
    """Messages waiting in each Celery queue (kombu's Redis lists, all priority levels)."""
    pipe = client.pipeline(transaction=False)
    for queue in QUEUES:
        for key in queue_lists(queue):
            pipe.llen(key)
    lengths = pipe.execute()
    per = len(queue_lists(QUEUES[0]))
    return {q: sum(lengths[i * per : (i + 1) * per]) for i, q in enumerate(QUEUES)}


class BacklogCollector(Collector):
    """Queue depth, oldest due work and dead letters, read at scrape time (cached briefly)."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        redis_client: redis.Redis,
        cache_seconds: float = 5.0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.sessions = sessions
        self.redis = redis_client
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > self.cache_seconds:
                self._cached = (now, self._read())
            yield from self._cached[1]

    def _read(self) -> list[Metric]:
        from dispatcher import backlog
        from dispatcher.db import read_transaction, utcnow

        families: list[Metric] = []
        up = GaugeMetricFamily(
            "dispatcher_backlog_scrape_ok",
            "1 when the database and Redis answered this scrape's backlog queries.",
        )
        try:
            depths = queue_depths(self.redis)
            with read_transaction(self.sessions) as session:
                snap = backlog.snapshot(session=session, now=(self.clock or utcnow)())
        except (SQLAlchemyError, RedisError, OSError):
            # A scrape must still answer while the database or Redis is down: the
            # process metrics matter most then, and backlog_scrape_ok says why.
            log.exception("backlog metrics unavailable")
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        depth = GaugeMetricFamily(
            "dispatcher_queue_depth", "Tasks waiting in each Celery queue.", labels=["queue"]
        )
        for queue, n in depths.items():
            depth.add_metric([queue], n)
        families += [up, depth]
        for name, text, value in (
            (
                "dispatcher_oldest_due_recipient_age_seconds",
                "Seconds the oldest due, unsent recipient has waited (0 when none).",
                snap.oldest_due_recipient_age,
            ),
            (
                "dispatcher_oldest_due_callback_age_seconds",
                "Seconds the oldest due, undelivered callback has waited (0 when none).",
                snap.oldest_due_callback_age,
            ),
            ("dispatcher_callbacks_dead", "Dead-lettered callbacks.", snap.dead_callbacks),
            ("dispatcher_callbacks_held", "Callbacks held (endpoint off).", snap.held_callbacks),
            ("dispatcher_endpoints_disabled", "Callback URLs disabled.", snap.disabled_endpoints),
        ):
            family = GaugeMetricFamily(name, text)
            family.add_metric([], value)
            families.append(family)
        return families
