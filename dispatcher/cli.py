"""The ``dispatcher`` command: database, accounts, keys, callbacks, status, SMPP, ``run``."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, TypeVar

import click
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.config import ConfigError, Settings
from dispatcher.db import make_engine, make_session_factory, transaction

if TYPE_CHECKING:
    from datetime import datetime

    from dispatcher.backlog import Progress

_F = TypeVar("_F", bound=Callable[..., Any])


@contextmanager
def _sessions(settings: Settings, *, publish: bool) -> Iterator[sessionmaker[Session]]:
    """Sessions on an engine disposed afterwards (no connection left to GC).

    With ``publish`` they are the workers' runtime's: their commits publish the tasks they
    queued to the broker, as the API's do (a callback replayed or released would otherwise
    wait for the sweep's requeue_after).
    """
    if publish:
        from workers.celery_app import create_celery

        app = create_celery(settings)
        try:
            yield app.runtime.sessions
        finally:
            app.runtime.dispose()
            app.close()
        return
    engine = make_engine(settings.database_url)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


@contextmanager
def _transaction(settings: Settings, *, publish: bool = False) -> Iterator[Session]:
    """One transaction of its own (see ``_sessions`` for ``publish``)."""
    with _sessions(settings, publish=publish) as sessions, transaction(sessions) as session:
        yield session


def _db_command(
    group: click.Group, name: str, *arguments: str, publish: bool = False
) -> Callable[[Callable[..., str]], click.Command]:
    """Declare ``group``'s command ``name`` taking ``arguments``, run in one transaction.

    The function gets ``session`` (and ``settings`` when it takes them) besides its
    parameters and returns its report, printed once the transaction has committed.
    """

    def declare(fn: Callable[..., str]) -> click.Command:
        wants_settings = "settings" in inspect.signature(fn).parameters

        @functools.wraps(fn)
        @click.pass_obj
        def command(settings: Settings, **params: Any) -> None:
            if wants_settings:
                params["settings"] = settings
            with _transaction(settings, publish=publish) as session:
                report = fn(session=session, **params)
            click.echo(report)

        for argument in reversed(arguments):
            command = click.argument(argument)(command)
        return group.command(name)(command)

    return declare


def _seconds(
    flag: str, low: float, high: float, *, default: float, help: str
) -> Callable[[_F], _F]:
    """An option of a duration in seconds, from ``low`` to ``high``."""
    kind = click.FloatRange(low, high)
    return click.option(flag, type=kind, default=default, show_default=True, help=help)


class _Group(click.Group):
    """Domain refusals (unknown id, conflict...) and settings that cannot be used print
    their reason and exit 1, no traceback."""

    def invoke(self, ctx: click.Context) -> object:
        from dispatcher.errors import DispatcherError

        try:
            return super().invoke(ctx)
        except DispatcherError as exc:
            raise click.ClickException(exc.message) from exc
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group)
@click.pass_context
def main(ctx: click.Context) -> None:
    """Dispatcher: a self-hosted message dispatch engine."""
    ctx.obj = Settings.from_env()


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.argument("revision", default="head")
@click.pass_obj
def db_upgrade(settings: Settings, revision: str) -> None:
    """Apply migrations up to REVISION (default: head)."""
    from dispatcher.migrate import upgrade

    upgrade(settings, revision)
    click.echo(f"database at {revision}")


@main.group()
def accounts() -> None:
    """Accounts (tenants)."""


@_db_command(accounts, "create", "name")
@click.option("--rate", type=float, default=None, help="Messages per second (default: configured).")
@click.option("--with-key/--no-key", default=True, help="Also issue an API key.")
def accounts_create(*, session: Session, name: str, rate: float | None, with_key: bool) -> str:
    """Create an account; prints its id, webhook secret and (once) an API key."""
    from dispatcher.accounts import service

    account = service.create_account(session=session, name=name, rate_limit=rate)
    lines = [f"account id:      {account.id}", f"webhook secret:  {account.webhook_secret}"]
    if with_key:
        key = service.create_key(session=session, account_id=account.id)
        lines.append(f"api key:         {key.key}   (shown once; store it now)")
    return "\n".join(lines)


@_db_command(accounts, "show", "account_id")
def accounts_show(*, session: Session, settings: Settings, account_id: str) -> str:
    """Show an account, its webhook secrets and its keys (prefixes only)."""
    from dispatcher.accounts import service

    account = service.get_account(session=session, account_id=account_id)
    lines = [
        f"account id:      {account.id}",
        f"name:            {account.name}",
        f"rate limit:      {account.rate_limit or settings.default_account_rate}/s",
        f"webhook secret:  {account.webhook_secret}",
    ]
    if account.previous_webhook_secret:
        lines.append(f"previous secret: {account.previous_webhook_secret} (rotation in progress)")
    for k in service.list_keys(session=session, account_id=account_id):
        state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
        lines.append(f"key {k.id}  {k.prefix}…  {state}")
    return "\n".join(lines)


@_db_command(accounts, "rotate-secret", "account_id")
@click.option("--finish", is_flag=True, help="Drop the previous secret (end the rotation).")
def accounts_rotate(*, session: Session, account_id: str, finish: bool) -> str:
    """Rotate the webhook signing secret (both are used until --finish)."""
    from dispatcher.accounts import service

    if finish:
        account = service.finish_rotation(session=session, account_id=account_id)
    else:
        account = service.rotate_webhook_secret(session=session, account_id=account_id)
    report = f"webhook secret:  {account.webhook_secret}"
    if account.previous_webhook_secret:
        report += f"\nprevious secret: {account.previous_webhook_secret} (still signing)"
    return report


@accounts.command("plan")
@click.argument("account_id")
@click.option("--default-originator", default=None, help="Sender used when a batch has no from.")
@click.option("--no-default-originator", is_flag=True, help="Clear the default originator.")
@click.option("--default-callback-url", default=None, help="Used when a batch has no callback_url.")
@click.option("--no-default-callback-url", is_flag=True, help="Clear the default callback URL.")
@click.option(
    "--callback-signing",
    type=click.Choice(["standard", "sinch"]),
    default=None,
    help="standard: Standard Webhooks headers; sinch: Sinch's X-Sinch-Webhook-Signature too.",
)
@click.pass_obj
def accounts_plan(
    settings: Settings,
    account_id: str,
    default_originator: str | None,
    no_default_originator: bool,
    default_callback_url: str | None,
    no_default_callback_url: bool,
    callback_signing: str | None,
) -> None:
    """Show or change the account's service plan settings (Sinch's defaults and signing)."""
    from dispatcher import netsafety
    from dispatcher.accounts import service

    changes: dict[str, str | None] = {}
    if default_originator is not None or no_default_originator:
        changes["default_originator"] = None if no_default_originator else default_originator
    if default_callback_url is not None or no_default_callback_url:
        if default_callback_url is not None and not no_default_callback_url:
            try:
                netsafety.check_url(default_callback_url, allow=settings.callback_allowlist)
            except netsafety.UnsafeURL as exc:
                raise click.ClickException(f"default callback URL refused: {exc}") from exc
            except OSError:
                pass  # Unresolvable now: the sender checks every address before each POST.
        changes["default_callback_url"] = None if no_default_callback_url else default_callback_url
    if callback_signing is not None:
        changes["callback_signing"] = callback_signing
    with _transaction(settings) as session:
        account = service.set_plan(session=session, account_id=account_id, **changes)
        click.echo(f"default originator:   {account.default_originator or '-'}")
        click.echo(f"default callback URL: {account.default_callback_url or '-'}")
        click.echo(f"callback signing:     {account.callback_signing}")


@main.group()
def keys() -> None:
    """API keys."""


@_db_command(keys, "create", "account_id")
def keys_create(*, session: Session, account_id: str) -> str:
    """Issue an API key for ACCOUNT_ID (printed once; only its hash is stored)."""
    from dispatcher.accounts import service

    key = service.create_key(session=session, account_id=account_id)
    return f"key id:   {key.id}\napi key:  {key.key}   (shown once; store it now)"


@_db_command(keys, "revoke", "key")
def keys_revoke(*, session: Session, key: str) -> str:
    """Revoke an API key, given its id or the key itself."""
    from dispatcher.accounts import service

    row = service.revoke_key(session=session, key_id=key)
    return f"revoked key {row.id} ({row.prefix}…)"


@main.command("run")
@click.pass_obj
def run(settings: Settings) -> None:
    """Start the whole system in the foreground (what `make run` does)."""
    from dispatcher.devserver import serve

    raise SystemExit(serve(settings))


@main.group()
def callbacks() -> None:
    """Webhook callbacks: dead letters, replay, endpoints."""


@callbacks.command("list")
@click.argument("account_id")
@click.option(
    "--state",
    type=click.Choice(["pending", "delivering", "delivered", "dead", "held"]),
    default=None,
    help="Only callbacks in this state.",
)
@click.option("--page", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--page-size", type=click.IntRange(1, 500), default=50, show_default=True)
@click.pass_obj
def callbacks_list(
    settings: Settings, account_id: str, state: str | None, page: int, page_size: int
) -> None:
    """List ACCOUNT_ID's callbacks, newest first."""
    from dispatcher.webhooks import queries

    with _transaction(settings) as session:
        rows, total = queries.list_callbacks(
            session=session, account_id=account_id, state=state, page=page, page_size=page_size
        )
        for c in rows:
            error = f"  {c.last_error}" if c.last_error else ""
            click.echo(
                f"{c.id}  {c.state:<10}  {c.event_type:<18}  attempts={c.attempts}  "
                f"{c.created_at:%Y-%m-%d %H:%M:%S}  {c.url}{error}"
            )
    click.echo(f"{len(rows)} of {total} callback(s), page {page}")


@_db_command(callbacks, "retry", "account_id", "callback_id", publish=True)
def callbacks_retry(*, session: Session, account_id: str, callback_id: str) -> str:
    """Replay a dead or held callback of ACCOUNT_ID now."""
    from dispatcher.db import utcnow
    from dispatcher.webhooks import queries

    queries.retry_callback(
        session=session, account_id=account_id, callback_id=callback_id, now=utcnow()
    )
    return f"callback {callback_id} queued for delivery"


@_db_command(callbacks, "enable", "account_id", "url", publish=True)
def callbacks_enable(*, session: Session, settings: Settings, account_id: str, url: str) -> str:
    """Re-enable ACCOUNT_ID's disabled callback URL and release its held callbacks."""
    from dispatcher.db import utcnow
    from dispatcher.webhooks import queries

    released = queries.enable_endpoint(
        session=session,
        account_id=account_id,
        url=url,
        now=utcnow(),
        batch_size=settings.callback_batch_size,
    )
    return f"endpoint {url} enabled; {released} held callback(s) released"


# -- SMPP: the connector, a local SMSC, routes, inbound numbers -------------------


@main.command("smpp-connector")
@click.option("--carrier", "carriers", multiple=True, help="Only these carriers (default: all).")
@click.pass_obj
def smpp_connector(settings: Settings, carriers: tuple[str, ...]) -> None:
    """Hold the SMPP binds and submit what send workers hand over (a long-lived process)."""
    import logging

    from dispatcher.channels.smpp.connector import Connector, run_forever
    from dispatcher.channels.smpp.sink import DatabaseSink
    from workers.celery_app import create_celery

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = settings.smpp_config()
    unknown = [c for c in carriers if c not in config.carriers]
    if unknown:
        raise click.BadParameter(f"no carrier {', '.join(unknown)}", param_hint="--carrier")
    # Receipts and inbound messages write callbacks, published to the broker after commit.
    app = create_celery(settings)
    runtime = app.runtime
    connector = Connector(
        config=config,
        redis_url=settings.redis_url,
        sink=DatabaseSink(
            sessions=runtime.sessions, redis_client=runtime.redis, wake=runtime.receipt_waker.at
        ),
        limiter=runtime.limiter,
        carriers=list(carriers) or None,
    )
    click.echo(f"smpp connector: {len(connector.links)} connection(s)")
    try:
        run_forever(connector)
    finally:
        runtime.dispose()
        app.close()


@main.command("smsc")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=2775, show_default=True)
@click.option("--receipt-delay", type=click.FloatRange(0, 3600), default=1.0, show_default=True)
@click.option("--reply/--no-reply", default=True, help="Answer each message with an MO.")
@click.option("--text-receipts", is_flag=True, help="Receipts in the text only, without TLVs.")
def smsc(host: str, port: int, receipt_delay: float, reply: bool, text_receipts: bool) -> None:
    """Run a local SMSC (smpp34's server) that accepts, sends receipts and replies."""
    import logging

    from dispatcher.channels.smpp.aio import run
    from dispatcher.channels.smpp.smsc import LocalSmsc

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = LocalSmsc(
        host=host,
        port=port,
        receipt_delay=receipt_delay,
        receipt_tlvs=not text_receipts,
        reply=reply,
    )
    click.echo(f"local SMSC on {host}:{port} (any system_id/password binds); Ctrl-C stops it")
    with suppress(KeyboardInterrupt):
        run(server.serve())


@main.group()
def routes() -> None:
    """The SMPP route table."""


@routes.command("show")
@click.option("--to", default=None, help="Show the carriers tried for this number, in order.")
@click.option("--account", default=None, help="With --to: as this account.")
@click.option("--channel", default="sms", show_default=True)
@click.pass_obj
def routes_show(settings: Settings, to: str | None, account: str | None, channel: str) -> None:
    """Print the route table (overrides first, longest prefix first), or one number's routes."""
    from dispatcher.routes import RouteTable

    table = RouteTable(settings.smpp_config().routes)
    if to:
        for i, r in enumerate(table.candidates(channel=channel, to=to, account_id=account), 1):
            click.echo(f"{i}. {r.carrier}  (prefix {r.prefix or '*'}, account {r.account or '*'})")
        return
    click.echo(f"{'channel':<9} {'prefix':<12} {'account':<38} carrier")
    for row in table.rows():
        click.echo(f"{row['channel']:<9} {row['prefix']:<12} {row['account']:<38} {row['carrier']}")


@main.group()
def smpp() -> None:
    """SMPP connections: what the connector reports."""


@smpp.command("status")
@click.pass_obj
def smpp_status(settings: Settings) -> None:
    """Each connection: bound or not, and its counters."""
    import redis

    from dispatcher.channels.smpp import handoff

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, decode_responses=True)
    try:
        for conn in settings.smpp_config().connections:
            up = bool(client.exists(handoff.alive_key(conn.name)))
            stats = {
                str(k): str(v) for k, v in client.hgetall(handoff.stats_key(conn.name)).items()
            }
            counters = " ".join(f"{k}={v}" for k, v in sorted(stats.items()))
            click.echo(
                f"{conn.name:<16} {'bound' if up else 'DOWN':<6} {conn.carrier:<12} {counters}"
            )
    finally:
        client.close()


@main.group()
def numbers() -> None:
    """Dedicated numbers that receive inbound messages."""


@_db_command(numbers, "assign", "number", "account_id")
def numbers_assign(*, session: Session, number: str, account_id: str) -> str:
    """Give NUMBER to ACCOUNT_ID: its inbound messages belong to that account."""
    from dispatcher.inbound import service

    service.assign_number(session=session, number=number, account_id=account_id)
    return f"{number} -> account {account_id}"


@main.group()
def inbound() -> None:
    """Inbound (MO) messages."""


@_db_command(inbound, "webhook", "account_id", "url")
@click.option("--dialect", type=click.Choice(["sinch", "native"]), default="native")
def inbound_webhook(
    *, session: Session, settings: Settings, account_id: str, url: str, dialect: str
) -> str:
    """Post ACCOUNT_ID's inbound messages to URL (signed like every callback)."""
    from dispatcher.inbound import service

    service.set_webhook(
        session=session,
        account_id=account_id,
        url=url,
        dialect=dialect,
        allow=settings.callback_allowlist,
    )
    return f"inbound messages of {account_id} -> {url} ({dialect})"


# --- capacity and progress ------------------------------------------------------------


@main.command("retry-now")
@click.option("--channel", default=None, help="Only recipients on this channel.")
@click.option("--code", default=None, help="Only those whose hand-off failed so (twilio_20003).")
@click.pass_obj
def retry_now(settings: Settings, channel: str | None, code: str | None) -> None:
    """Retry now what waits after a failed hand-off (a carrier or its credentials fixed)."""
    from dispatcher.db import utcnow

    with _transaction(settings) as session:
        n = _bring_retries_forward(session=session, now=utcnow(), channel=channel, code=code)
    click.echo(f"{n} recipient(s) will be handed over again within seconds (the scheduler's sweep)")


def _bring_retries_forward(
    *, session: Session, now: datetime, channel: str | None, code: str | None
) -> int:
    """Make the retries of queued recipients whose last hand-off failed due now.

    Clearing ``enqueued_at`` lets the scheduler's next sweep publish them (promote_due);
    a task already published for the old time finds them claimed or sent, which the
    claim makes harmless. Rows a rate limit deferred carry no error code and keep
    their booked time.
    """
    from sqlalchemy import select, update

    from dispatcher.batches.models import Batch, Recipient
    from dispatcher.states import BatchStatus, RecipientStatus

    conditions = [
        Recipient.status == RecipientStatus.QUEUED,
        Recipient.error_code.is_not(None),
        Recipient.next_attempt_at > now,
        Recipient.batch_id.in_(select(Batch.id).where(Batch.status == BatchStatus.SENDING)),
    ]
    if channel:
        conditions.append(Recipient.channel == channel)
    if code:
        conditions.append(Recipient.error_code == code)
    result = session.execute(
        update(Recipient)
        .where(*conditions)
        .values(next_attempt_at=now, enqueued_at=None)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


@main.command("status")
@_seconds("--timeout", 0.1, 30.0, default=1.0, help="Seconds to wait for workers to answer.")
@click.pass_obj
def status(settings: Settings, timeout: float) -> None:
    """Queues, workers, throughput over the last minute, and the largest backlogs."""
    import redis

    from dispatcher import backlog, health, metrics
    from dispatcher.db import utcnow

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        depths = metrics.queue_depths(client)
        beating = health.nodes_seen(client=client)
    finally:
        client.close()
    workers = _workers_by_queue(settings, timeout, expected=len(beating))
    now = utcnow()
    with _transaction(settings) as session:
        snap = backlog.snapshot(session=session, now=now)
        rates = backlog.rates(session=session, now=now)
        biggest = backlog.largest_backlogs(session=session, now=now)
        retries = _waiting_retries(session=session)
    ages = {
        "dispatch": snap.oldest_undispatched_batch_age,
        "send": snap.oldest_due_recipient_age,
        "callbacks": snap.oldest_due_callback_age,
    }
    click.echo(f"{'queue':<10} {'depth':>7} {'oldest due':>11}  workers")
    for queue in metrics.QUEUES:
        nodes = workers.get(queue, [])
        seen = f"{len(nodes)}  {', '.join(sorted(nodes))}" if nodes else "0  (none answered)"
        click.echo(f"{queue:<10} {depths[queue]:>7} {ages[queue]:>10.1f}s  {seen}")
    click.echo(f"\nlast minute: {rates['sends']:.1f} sends/s, {rates['callbacks']:.1f} callbacks/s")
    click.echo(
        f"callbacks: {snap.dead_callbacks} dead, {snap.held_callbacks} held; "
        f"{snap.disabled_endpoints} endpoint(s) disabled"
    )
    click.echo("\nlargest backlogs (due, unsent recipients):")
    for account_id, n in biggest:
        click.echo(f"  {account_id}  {n}")
    if not biggest:
        click.echo("  none")
    from dispatcher.channels.registry import selected

    chosen = ", ".join(f"{c} {name}" for c, name in selected(settings).items())
    click.echo(f"\nproviders: {chosen}")
    click.echo("waiting for a retry after a failed hand-off (channel, error, recipients, next):")
    for channel, code, n, next_at in retries:
        due = max(0.0, (next_at - now).total_seconds())
        click.echo(f"  {channel:<9} {code:<24} {n:>7}  in {due:.0f}s")
    if not retries:
        click.echo("  none")


def _waiting_retries(*, session: Session, limit: int = 5) -> list[tuple[str, str, int, datetime]]:
    """Recipients queued again after a failed hand-off, by channel and error code, with
    their next try: how refused credentials or a carrier that is down show.

    Read through the (status, next_attempt_at) index; rows a rate limit deferred carry
    no error code.
    """
    from sqlalchemy import func, select

    from dispatcher.batches.models import Recipient
    from dispatcher.states import RecipientStatus

    count = func.count()
    rows = session.execute(
        select(Recipient.channel, Recipient.error_code, count, func.min(Recipient.next_attempt_at))
        .where(
            Recipient.status == RecipientStatus.QUEUED,
            Recipient.next_attempt_at.is_not(None),
            Recipient.error_code.is_not(None),
        )
        .group_by(Recipient.channel, Recipient.error_code)
        .order_by(count.desc())
        .limit(limit)
    ).all()
    return [(str(c), str(code), int(n), at) for c, code, n, at in rows if at is not None]


def _workers_by_queue(
    settings: Settings, timeout: float, *, expected: int = 0
) -> dict[str, list[str]]:
    """Worker nodes that answered within ``timeout``, by the queues they consume.

    Done once the ``expected`` nodes (those with a live heartbeat) have answered, not
    at the timeout: only a node that is missing costs the whole wait.
    """
    from workers.celery_app import create_celery

    app = create_celery(settings)
    try:
        inspect = app.control.inspect(timeout=timeout, limit=expected or None)
        replies = inspect.active_queues() or {}
    except OSError:  # the broker is down: no worker can be seen
        replies = {}
    finally:
        app.runtime.dispose()
        app.close()
    seen: dict[str, list[str]] = {}
    for node, queues in replies.items():
        for queue in queues or []:
            seen.setdefault(str(queue.get("name")), []).append(node)
    return seen


@main.group()
def batches() -> None:
    """Batches: progress by status."""


def _progress_line(p: Progress, width: int = 30) -> str:
    share = p.done / p.total if p.total else 1.0
    filled = round(share * width)
    counts = " ".join(f"{k}={v}" for k, v in p.counts.items() if v)
    return f"[{'#' * filled}{'.' * (width - filled)}] {share:6.1%} {p.status:<9} {counts}"


def _load_progress(settings: Settings, batch_id: str) -> Progress:
    from dispatcher import backlog

    with _transaction(settings) as session:
        found = backlog.progress(session=session, batch_id=batch_id)
    if found is None:
        raise click.ClickException(f"batch {batch_id} not found")
    return found


@batches.command("show")
@click.argument("batch_id")
@click.pass_obj
def batches_show(settings: Settings, batch_id: str) -> None:
    """A batch's status and its recipients by status."""
    p = _load_progress(settings, batch_id)
    click.echo(f"batch {p.batch_id}  account {p.account_id}")
    click.echo(f"status {p.status}  send_at {p.send_at:%Y-%m-%d %H:%M:%S}Z  recipients {p.total}")
    for name, n in p.counts.items():
        if n:
            click.echo(f"  {name:<10} {n}")
    click.echo(_progress_line(p))


@batches.command("watch")
@click.argument("batch_id")
@_seconds("--interval", 0.2, 60.0, default=1.0, help="Seconds between refreshes.")
@_seconds("--timeout", 1.0, 86400.0, default=3600.0, help="Give up after this many seconds.")
@click.pass_obj
def batches_watch(settings: Settings, batch_id: str, interval: float, timeout: float) -> None:
    """Live progress by status until the batch is final (or --timeout)."""
    import sys
    import threading
    import time

    tty = sys.stdout.isatty()
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        p = _load_progress(settings, batch_id)
        line = _progress_line(p)
        click.echo(f"\r\x1b[2K{line}" if tty else line, nl=not tty)
        if p.final:
            if tty:
                click.echo()
            click.echo(f"batch {p.batch_id} is final: {p.status}")
            return
        if time.monotonic() >= deadline:
            if tty:
                click.echo()
            raise click.ClickException(f"still {p.status} after {timeout:.0f}s")
        pause.wait(interval)
