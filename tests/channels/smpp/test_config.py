"""SMPP configuration: a bad value names its field; a password never shows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dispatcher.channels.smpp.config import SmppConfigError, parse
from dispatcher.config import ConfigError, Settings
from dispatcher.routes import RouteTable

SECRET = "s3cr3t"


def conn(**extra: Any) -> dict[str, Any]:
    return {
        "name": "uk-1",
        "host": "127.0.0.1",
        "port": 2775,
        "system_id": "disp",
        "password": SECRET,
        **extra,
    }


def config(**conn_extra: Any) -> dict[str, Any]:
    return {"carriers": {"uk": {"connections": [conn(**conn_extra)]}}}


def test_a_good_config_parses_with_defaults() -> None:
    parsed = parse(config(window=20, throughput=50, bind="transmitter_receiver", tls=True))
    (c,) = parsed.connections
    assert (c.window, c.throughput, c.bind, c.tls, c.carrier) == (
        20,
        50.0,
        "transmitter_receiver",
        True,
        "uk",
    )
    assert parsed.routes[0].carrier == "uk"
    assert SECRET not in repr(parsed)
    assert SECRET not in json.dumps(parsed.redacted())


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"port": 70000}, "carriers.uk.connections[0].port"),
        ({"port": "2775"}, "carriers.uk.connections[0].port"),
        ({"window": 0}, "carriers.uk.connections[0].window"),
        ({"bind": "both"}, "carriers.uk.connections[0].bind"),
        ({"throughput": -1}, "carriers.uk.connections[0].throughput"),
        ({"tls": "yes"}, "carriers.uk.connections[0].tls"),
        ({"system_id": "x" * 20}, "carriers.uk.connections[0].system_id"),
        ({"password": "far-too-long-" + SECRET}, "carriers.uk.connections[0].password"),
        ({"colour": "red"}, "carriers.uk.connections[0].colour"),
        ({"password_env": "NOT_SET_ANYWHERE"}, "carriers.uk.connections[0].password_env"),
    ],
)
def test_a_bad_value_names_its_field_and_never_the_password(
    extra: dict[str, Any], field: str
) -> None:
    raw = config(**extra)
    if "password_env" in extra:
        del raw["carriers"]["uk"]["connections"][0]["password"]
    with pytest.raises(SmppConfigError) as caught:
        parse(raw, env={})
    assert str(caught.value).startswith(field)
    assert SECRET not in str(caught.value)


def test_routes_must_name_a_carrier_and_use_digits() -> None:
    raw = config()
    raw["routes"] = [{"prefix": "+44", "carrier": "nope"}]
    with pytest.raises(SmppConfigError, match=r"^routes\[0\]\.carrier"):
        parse(raw)
    raw["routes"] = [{"prefix": "+44x", "carrier": "uk"}]
    with pytest.raises(SmppConfigError, match=r"^routes\[0\]\.prefix"):
        parse(raw)


def test_password_from_the_environment() -> None:
    raw = config()
    del raw["carriers"]["uk"]["connections"][0]["password"]
    raw["carriers"]["uk"]["connections"][0]["password_env"] = "UK_PW"
    assert parse(raw, env={"UK_PW": "pw"}).connections[0].password == "pw"


def test_settings_refuse_to_start_with_a_bad_smpp_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"required when the provider is smpp"):
        Settings(provider="smpp")
    with pytest.raises(ConfigError, match=r"^carriers\.uk\.connections\[0\]\.port"):
        Settings(provider="smpp", smpp=config(port=0))
    path = tmp_path / "smpp.json"
    path.write_text(json.dumps(config()))
    assert Settings(provider="smpp", smpp_file=str(path)).smpp_config().connections[0].name
    env = Settings.from_env({"DISPATCHER_PROVIDER": "smpp", "DISPATCHER_SMPP_FILE": str(path)})
    assert env.provider == "smpp"


def test_route_table_longest_prefix_account_override_and_failover_order() -> None:
    raw = {
        "carriers": {
            name: {"connections": [conn(name=f"{name}-1")]} for name in ("uk", "eu", "any", "vip")
        },
        "routes": [
            {"prefix": "", "carrier": "any"},
            {"prefix": "+44", "carrier": "uk"},
            {"prefix": "+4", "carrier": "eu"},
            {"prefix": "+44", "carrier": "vip", "account": "acct-1"},
            {"prefix": "+44", "carrier": "any"},
        ],
    }
    table = RouteTable(parse(raw).routes)
    order = [r.carrier for r in table.candidates(channel="sms", to="+447700", account_id=None)]
    assert order == ["uk", "any", "eu"]
    vip = [r.carrier for r in table.candidates(channel="sms", to="+447700", account_id="acct-1")]
    assert vip == ["vip", "uk", "any", "eu"]
    assert [r.carrier for r in table.candidates(channel="sms", to="+49", account_id=None)] == [
        "eu",
        "any",
    ]
    assert table.candidates(channel="rcs", to="+44", account_id=None) == []
