"""The SMPP commands: routes show, numbers assign, inbound webhook, and a bad config at startup."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from sqlalchemy import select

from dispatcher.accounts import service as accounts
from dispatcher.cli import main
from dispatcher.config import Settings
from dispatcher.db import make_engine, make_session_factory, transaction
from dispatcher.devserver import commands
from dispatcher.inbound.models import InboundNumber, InboundWebhook
from dispatcher.migrate import upgrade

CONFIG = {
    "carriers": {
        name: {
            "connections": [
                {
                    "name": f"{name}-1",
                    "host": "127.0.0.1",
                    "port": 2775,
                    "system_id": name,
                    "password": "topsecr",
                }
            ]
        }
        for name in ("uk", "world")
    },
    "routes": [
        {"prefix": "", "carrier": "world"},
        {"prefix": "+44", "carrier": "uk"},
        {"prefix": "+44", "carrier": "world", "account": "acct-1"},
    ],
}


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    path = tmp_path / "smpp.json"
    path.write_text(json.dumps(CONFIG))
    return {
        "DISPATCHER_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
        "DISPATCHER_VAR_DIR": str(tmp_path),
        "DISPATCHER_PROVIDER": "smpp",
        "DISPATCHER_SMPP_FILE": str(path),
        **extra,
    }


def test_routes_show_prints_the_table_and_one_numbers_failover_order(tmp_path: Path) -> None:
    runner = CliRunner()
    table = runner.invoke(main, ["routes", "show"], env=env(tmp_path))
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()[1:]
    assert [line.split()[-1] for line in lines] == ["world", "uk", "world"]
    assert "acct-1" in lines[0]
    one = runner.invoke(main, ["routes", "show", "--to", "+447700900123"], env=env(tmp_path))
    assert [line.split()[1] for line in one.output.splitlines()] == ["uk", "world"]
    vip = runner.invoke(
        main, ["routes", "show", "--to", "+447700900123", "--account", "acct-1"], env=env(tmp_path)
    )
    assert vip.output.splitlines()[0].split()[1] == "world"
    assert "topsecr" not in table.output + one.output + vip.output


def test_a_bad_smpp_config_stops_the_command_naming_the_field(tmp_path: Path) -> None:
    broken = dict(CONFIG, routes=[{"prefix": "+44", "carrier": "mars"}])
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    result = CliRunner().invoke(
        main, ["routes", "show"], env=env(tmp_path, DISPATCHER_SMPP_FILE=str(path))
    )
    assert result.exit_code != 0
    assert "routes[0].carrier" in str(result.exception) + result.output


def test_numbers_and_inbound_webhook_commands(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    upgrade(Settings(database_url=url))
    sessions = make_session_factory(make_engine(url))
    with transaction(sessions) as session:
        account = accounts.create_account(session=session, name="mo")
    runner = CliRunner()
    e = env(tmp_path, DISPATCHER_CALLBACK_ALLOWLIST="127.0.0.1")
    ok = runner.invoke(main, ["numbers", "assign", "447700900123", account.id], env=e)
    assert ok.exit_code == 0, ok.output
    hook = ["inbound", "webhook", account.id, "http://127.0.0.1:9/mo", "--dialect", "sinch"]
    assert runner.invoke(main, hook, env=e).exit_code == 0
    refused = runner.invoke(main, ["inbound", "webhook", account.id, "http://10.1.2.3/"], env=e)
    assert refused.exit_code == 1
    missing = runner.invoke(main, ["numbers", "assign", "447700900124", "nope"], env=e)
    assert missing.exit_code == 1 and "no account nope" in missing.output
    with sessions() as session:
        assert session.scalars(select(InboundNumber.number)).all() == ["+447700900123"]
        assert session.get(InboundWebhook, account.id).dialect == "sinch"  # type: ignore[union-attr]


def test_dispatcher_run_starts_the_connector_only_for_smpp(tmp_path: Path) -> None:
    smpp = Settings(var_dir=str(tmp_path), provider="smpp", smpp=CONFIG)
    assert commands(smpp)["smpp-connector"][-1] == "smpp-connector"
    assert "smpp-connector" not in commands(Settings(var_dir=str(tmp_path)))
