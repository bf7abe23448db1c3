"""The ``dispatcher`` command on a fresh SQLite file: accounts, keys, secrets."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.accounts import service as accounts
from dispatcher.accounts.models import Account, ApiKey
from dispatcher.cli import main
from dispatcher.config import Settings
from dispatcher.db import make_engine, make_session_factory
from dispatcher.errors import Unauthenticated
from dispatcher.migrate import upgrade


class Cli:
    """Runs ``dispatcher ...`` against one database, as an operator would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self.env = {"DISPATCHER_DATABASE_URL": self.url, "DISPATCHER_VAR_DIR": str(path.parent)}
        self.runner = CliRunner()
        self.engine = make_engine(self.url)
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine)

    def __call__(self, *args: str, ok: bool = True) -> Result:
        result = self.runner.invoke(main, list(args), env=self.env)
        if ok:
            assert result.exit_code == 0, (result.output, result.exception)
        return result

    def authenticate(self, key: str) -> Account:
        with self.sessions() as session:
            return accounts.authenticate(session=session, key=key)


@pytest.fixture()
def cli(tmp_path: Path) -> Iterator[Cli]:
    path = tmp_path / "cli.db"
    upgrade(Settings(database_url=f"sqlite:///{path}"))
    runner = Cli(path)
    yield runner
    runner.engine.dispose()


def field(output: str, label: str) -> str:
    """The value printed after ``label:``."""
    match = re.search(rf"^{re.escape(label)}:\s+(\S+)", output, re.MULTILINE)
    assert match, f"{label!r} not in {output!r}"
    return match.group(1)


def create_account(cli: Cli, name: str = "acme", *extra: str) -> tuple[str, str, str]:
    out = cli("accounts", "create", name, *extra).output
    return field(out, "account id"), field(out, "webhook secret"), field(out, "api key")


def test_accounts_create_prints_a_key_that_authenticates(cli: Cli) -> None:
    account_id, secret, key = create_account(cli)
    assert key.startswith(accounts.KEY_PREFIX)
    assert secret.startswith("whsec_")
    account = cli.authenticate(key)
    assert (account.id, account.name, account.webhook_secret) == (account_id, "acme", secret)


def test_only_the_hash_is_stored(cli: Cli) -> None:
    account_id, _, key = create_account(cli)
    with cli.sessions() as session:
        stored = session.execute(text("SELECT * FROM api_keys")).all()
        row = session.scalar(select(ApiKey).where(ApiKey.account_id == account_id))
    assert row is not None
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert len(stored) == 1
    assert all(key not in str(value) for value in stored[0])
    # Nor anywhere in the database files (WAL included): the plaintext left with the output.
    cli.engine.dispose()
    for path in cli.path.parent.glob(cli.path.name + "*"):
        assert key.encode() not in path.read_bytes(), path


def test_accounts_create_without_key(cli: Cli) -> None:
    out = cli("accounts", "create", "keyless", "--no-key").output
    assert "api key" not in out
    with cli.sessions() as session:
        keys = accounts.list_keys(session=session, account_id=field(out, "account id"))
    assert keys == []


def test_keys_create_and_revoke(cli: Cli) -> None:
    account_id, _, first = create_account(cli)
    out = cli("keys", "create", account_id).output
    key_id, second = field(out, "key id"), field(out, "api key")
    assert second != first
    assert cli.authenticate(second).id == account_id
    revoked = cli("keys", "revoke", key_id).output
    assert key_id in revoked
    with pytest.raises(Unauthenticated):
        cli.authenticate(second)
    # The other key is untouched.
    assert cli.authenticate(first).id == account_id


def test_keys_revoke_by_the_key_itself(cli: Cli) -> None:
    _, _, key = create_account(cli)
    out = cli("keys", "revoke", key).output
    assert key not in out  # only the id and prefix are echoed
    with pytest.raises(Unauthenticated):
        cli.authenticate(key)


def test_revoking_twice_keeps_it_revoked(cli: Cli) -> None:
    _, _, key = create_account(cli)
    cli("keys", "revoke", key)
    cli("keys", "revoke", key)
    with pytest.raises(Unauthenticated):
        cli.authenticate(key)


def test_unknown_ids_fail(cli: Cli) -> None:
    _, _, key = create_account(cli)
    for args in (
        ("keys", "revoke", "no-such-key"),
        ("keys", "create", "no-such-account"),
        ("accounts", "show", "no-such-account"),
        ("accounts", "rotate-secret", "no-such-account"),
    ):
        assert cli(*args, ok=False).exit_code != 0, args
    assert cli.authenticate(key).name == "acme"
    with cli.sessions() as session:
        assert session.scalar(select(ApiKey).where(ApiKey.revoked_at.is_not(None))) is None


def test_unknown_ids_fail_with_a_message(cli: Cli) -> None:
    result = cli("keys", "revoke", "no-such-key", ok=False)
    assert "no such API key" in result.output


def test_rotate_secret_keeps_the_previous_until_finished(cli: Cli) -> None:
    account_id, old, _ = create_account(cli)
    out = cli("accounts", "rotate-secret", account_id).output
    new = field(out, "webhook secret")
    assert new != old
    assert field(out, "previous secret") == old
    with cli.sessions() as session:
        account = accounts.get_account(session=session, account_id=account_id)
        assert account.webhook_secrets == [new, old]
    shown = cli("accounts", "show", account_id).output
    assert field(shown, "previous secret") == old
    finished = cli("accounts", "rotate-secret", account_id, "--finish").output
    assert field(finished, "webhook secret") == new
    assert "previous secret" not in finished
    with cli.sessions() as session:
        account = accounts.get_account(session=session, account_id=account_id)
        assert account.webhook_secrets == [new]


def test_accounts_show(cli: Cli) -> None:
    account_id, secret, key = create_account(cli, "Shown Ltd", "--rate", "7.5")
    with cli.sessions() as session:
        [row] = accounts.list_keys(session=session, account_id=account_id)
    cli("keys", "revoke", row.id)
    second = field(cli("keys", "create", account_id).output, "api key")
    out = cli("accounts", "show", account_id).output
    assert field(out, "account id") == account_id
    assert "Shown Ltd" in out
    assert "7.5/s" in out
    assert field(out, "webhook secret") == secret
    lines = [line for line in out.splitlines() if line.startswith("key ")]
    assert len(lines) == 2
    assert any(row.id in line and "revoked" in line for line in lines)
    assert sum("active" in line for line in lines) == 1
    # Prefixes only: neither plaintext key is shown again.
    assert key not in out and second not in out
    assert key[:12] in out and second[:12] in out


def test_db_upgrade_on_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "new" / "fresh.db"
    env = {"DISPATCHER_DATABASE_URL": f"sqlite:///{path}", "DISPATCHER_VAR_DIR": str(tmp_path)}
    result = CliRunner().invoke(main, ["db", "upgrade"], env=env)
    assert result.exit_code == 0, result.output
    assert "head" in result.output
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            tables = {row[0] for row in conn.execute(text("SELECT name FROM sqlite_master"))}
    finally:
        engine.dispose()
    assert {"accounts", "api_keys", "batches", "recipients"} <= tables


def test_bad_environment_is_refused(cli: Cli) -> None:
    result = CliRunner().invoke(
        main, ["accounts", "show", "x"], env={**cli.env, "DISPATCHER_API_PORT": "eighty"}
    )
    assert result.exit_code != 0
    assert "DISPATCHER_API_PORT" in str(result.exception) + result.output


def test_settings_that_cannot_be_used_print_one_line_naming_what_to_set(cli: Cli) -> None:
    env = {**cli.env, "DISPATCHER_CHANNEL_PROVIDERS": '{"sms": "twilio"}'}
    result = CliRunner().invoke(main, ["status"], env=env)
    assert result.exit_code == 1
    # click's usage error, not a traceback: the operator reads what to set.
    assert isinstance(result.exception, SystemExit)
    assert result.output.startswith("Error: the twilio provider (channel sms) needs")
    assert "DISPATCHER_TWILIO_AUTH_TOKEN" in result.output


@pytest.mark.parametrize("rate", ["-5", "nan", "inf"])
def test_accounts_create_refuses_a_rate_the_sender_cannot_use(cli: Cli, rate: str) -> None:
    result = cli("accounts", "create", "careless", "--rate", rate, ok=False)
    assert result.exit_code == 1 and "rate" in result.output, result.output
    with cli.sessions() as session:
        assert session.scalar(select(Account).where(Account.name == "careless")) is None
