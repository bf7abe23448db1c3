"""The ``dispatcher`` console command: database, accounts, keys, callbacks, and ``run``."""

from __future__ import annotations

import click

from dispatcher.config import Settings
from dispatcher.db import make_engine, make_session_factory, transaction


def _sessions(settings: Settings):  # type: ignore[no-untyped-def]
    return make_session_factory(make_engine(settings.database_url))


@click.group()
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


@accounts.command("create")
@click.argument("name")
@click.option("--rate", type=float, default=None, help="Messages per second (default: configured).")
@click.option("--with-key/--no-key", default=True, help="Also issue an API key.")
@click.pass_obj
def accounts_create(settings: Settings, name: str, rate: float | None, with_key: bool) -> None:
    """Create an account; prints its id, webhook secret and (once) an API key."""
    from dispatcher.accounts import service

    with transaction(_sessions(settings)) as session:
        account = service.create_account(session=session, name=name, rate_limit=rate)
        key = service.create_key(session=session, account_id=account.id) if with_key else None
    click.echo(f"account id:      {account.id}")
    click.echo(f"webhook secret:  {account.webhook_secret}")
    if key:
        click.echo(f"api key:         {key.key}   (shown once; store it now)")


@accounts.command("show")
@click.argument("account_id")
@click.pass_obj
def accounts_show(settings: Settings, account_id: str) -> None:
    """Show an account, its webhook secrets and its keys (prefixes only)."""
    from dispatcher.accounts import service

    with transaction(_sessions(settings)) as session:
        account = service.get_account(session=session, account_id=account_id)
        keys = service.list_keys(session=session, account_id=account_id)
        click.echo(f"account id:      {account.id}\nname:            {account.name}")
        click.echo(f"rate limit:      {account.rate_limit or settings.default_account_rate}/s")
        click.echo(f"webhook secret:  {account.webhook_secret}")
        if account.previous_webhook_secret:
            click.echo(f"previous secret: {account.previous_webhook_secret} (rotation in progress)")
        for k in keys:
            state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
            click.echo(f"key {k.id}  {k.prefix}…  {state}")


@accounts.command("rotate-secret")
@click.argument("account_id")
@click.option("--finish", is_flag=True, help="Drop the previous secret (end the rotation).")
@click.pass_obj
def accounts_rotate(settings: Settings, account_id: str, finish: bool) -> None:
    """Rotate the webhook signing secret (both are used until --finish)."""
    from dispatcher.accounts import service

    with transaction(_sessions(settings)) as session:
        if finish:
            account = service.finish_rotation(session=session, account_id=account_id)
        else:
            account = service.rotate_webhook_secret(session=session, account_id=account_id)
    click.echo(f"webhook secret:  {account.webhook_secret}")
    if account.previous_webhook_secret:
        click.echo(f"previous secret: {account.previous_webhook_secret} (still signing)")


@main.group()
def keys() -> None:
    """API keys."""


@keys.command("create")
@click.argument("account_id")
@click.pass_obj
def keys_create(settings: Settings, account_id: str) -> None:
    """Issue an API key for ACCOUNT_ID (printed once; only its hash is stored)."""
    from dispatcher.accounts import service

    with transaction(_sessions(settings)) as session:
        key = service.create_key(session=session, account_id=account_id)
    click.echo(f"key id:   {key.id}")
    click.echo(f"api key:  {key.key}   (shown once; store it now)")


@keys.command("revoke")
@click.argument("key")
@click.pass_obj
def keys_revoke(settings: Settings, key: str) -> None:
    """Revoke an API key, given its id or the key itself."""
    from dispatcher.accounts import service

    with transaction(_sessions(settings)) as session:
        row = service.revoke_key(session=session, key_id=key)
    click.echo(f"revoked key {row.id} ({row.prefix}…)")


@main.command("run")
@click.pass_obj
def run(settings: Settings) -> None:
    """Start the whole system in the foreground (what `make run` does)."""
    from dispatcher.devserver import serve

    raise SystemExit(serve(settings))
