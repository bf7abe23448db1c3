"""Settings from the environment: parsing, refusals, and the to_env round trip."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from dispatcher.config import PREFIX, ConfigError, Settings


def env(**values: str) -> dict[str, str]:
    return {PREFIX + name.upper(): value for name, value in values.items()}


def test_no_environment_means_defaults(tmp_path: Path) -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.min_send_at_lead == 300.0
    assert settings.database_url == f"sqlite:///{Path('var').resolve() / 'dispatcher.db'}"
    assert Settings(var_dir=str(tmp_path)).database_url == f"sqlite:///{tmp_path / 'dispatcher.db'}"


def test_every_kind_of_value_is_parsed() -> None:
    settings = Settings.from_env(
        env(
            database_url="postgresql+psycopg://u@h/db",
            api_port="8080",
            min_send_at_lead="12.5",
            embedded_redis="off",
            channels="sms, rcs ,whatsapp,fax",
            send_retry_schedule="1, 2.5,10",
            channel_rates="sms=5, rcs=0.5",
            simulator='{"latency_ms": 3, "invalid": ["^\\\\+1"]}',
            dlr_secrets='{"carrier": 42}',
            callback_allowlist="127.0.0.1,hooks.internal",
            shared_senders="A,B",
        )
    )
    assert settings.database_url == "postgresql+psycopg://u@h/db"
    assert settings.api_port == 8080
    assert settings.min_send_at_lead == 12.5
    assert settings.embedded_redis is False
    assert settings.channels == ("sms", "rcs", "whatsapp", "fax")
    assert settings.send_retry_schedule == (1.0, 2.5, 10.0)
    assert settings.channel_rates == {"sms": 5.0, "rcs": 0.5}
    assert settings.simulator == {"latency_ms": 3, "invalid": ["^\\+1"]}
    assert settings.dlr_secrets == {"carrier": "42"}
    # Entries are normalised: a bare address becomes its /32 network.
    assert settings.callback_allowlist == ("127.0.0.1/32", "hooks.internal")
    assert settings.shared_senders == ("A", "B")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        (" on ", True),
        ("0", False),
        ("False", False),
        ("no", False),
        ("off", False),
        ("", False),
    ],
)
def test_booleans(text: str, expected: bool) -> None:
    assert Settings.from_env(env(embedded_redis=text)).embedded_redis is expected


def test_empty_lists_and_maps() -> None:
    settings = Settings.from_env(
        env(callback_allowlist="", channel_rates="", simulator="", dlr_secrets=" ")
    )
    assert settings.callback_allowlist == ()
    assert settings.channel_rates == {}
    assert settings.simulator == {}
    assert settings.dlr_secrets == {}


def test_other_variables_are_ignored() -> None:
    settings = Settings.from_env(
        {"DISPATCHER_TEST_POSTGRES_URL": "postgresql://x", "PATH": "/bin", "API_PORT": "1"}
    )
    assert settings == Settings()


def test_overrides_win_over_the_environment() -> None:
    settings = Settings.from_env(env(api_port="1000"), api_port=2000)
    assert settings.api_port == 2000


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("api_port", "eighty"),
        ("api_port", "80.5"),
        ("max_destinations", ""),
        ("min_send_at_lead", "soon"),
        ("embedded_redis", "maybe"),
        ("send_retry_schedule", "1,two,3"),
        ("channel_rates", "sms"),
        ("channel_rates", "sms=fast"),
        ("simulator", "[1, 2]"),
        ("simulator", "{not json"),
        ("dlr_secrets", '"text"'),
    ],
)
def test_unparsable_values_raise_config_error_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=PREFIX + name.upper()):
        Settings.from_env(env(**{name: value}))


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("default_channel", "fax", "default channel"),
        ("channels", "", "default channel"),
        ("chunk_size", "0", "CHUNK_SIZE"),
        ("max_destinations", "0", "MAX_DESTINATIONS"),
    ],
)
def test_values_breaking_a_rule_raise_config_error(name: str, value: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        Settings.from_env(env(**{name: value}))


def test_visibility_timeout_must_cover_twice_the_horizon() -> None:
    with pytest.raises(ConfigError, match="visibility_timeout"):
        Settings(schedule_horizon=300, visibility_timeout=599)
    with pytest.raises(ConfigError, match="visibility_timeout"):
        Settings.from_env(env(schedule_horizon="1000", visibility_timeout="1999"))
    with pytest.raises(ConfigError):
        Settings().replace(visibility_timeout=10)
    assert Settings(schedule_horizon=300, visibility_timeout=700).visibility_timeout == 700


def test_to_env_round_trip_of_the_defaults() -> None:
    settings = Settings()
    assert Settings.from_env(settings.to_env()) == settings


def test_to_env_round_trip_of_every_field_changed(tmp_path: Path) -> None:
    settings = Settings(
        var_dir=str(tmp_path),
        database_url="sqlite:///" + str(tmp_path / "x.db"),
        redis_url="redis://10.0.0.2:6380/3",
        embedded_redis=False,
        api_port=9000,
        flower_basic_auth="admin:secret",
        channels=("sms", "rcs"),
        default_channel="rcs",
        max_destinations=7,
        min_send_at_lead=0,
        shared_senders=("One",),
        callback_allowlist=("127.0.0.1", "10.0.0.0/8"),
        schedule_horizon=45.5,
        visibility_timeout=100,
        task_soft_time_limit=20,
        task_time_limit=30,
        send_time_slice=2.5,
        channel_rates={"sms": 2.5, "rcs": 10.0},
        send_retry_schedule=(0.5, 1.0),
        simulator={"latency_ms": 0, "unreachable": {"rcs": ["^\\+4477009"]}},
        dlr_secrets={"carrier": "s3cr3t"},
        callback_retry_schedule=(1.0,),
    )
    variables = settings.to_env()
    assert set(variables) == {PREFIX + f.name.upper() for f in fields(Settings)}
    assert all(isinstance(v, str) for v in variables.values())
    assert Settings.from_env(variables) == settings


def test_replace_makes_a_checked_copy() -> None:
    base = Settings()
    copy = base.replace(min_send_at_lead=0)
    assert copy.min_send_at_lead == 0 and base.min_send_at_lead == 300.0
    with pytest.raises(ConfigError):
        base.replace(default_channel="fax")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("schedule_horizon", "-1"),
        ("schedule_horizon", "nan"),
        ("min_send_at_lead", "-5"),
        ("max_body_length", "0"),
        ("max_request_bytes", "-1"),
        ("api_port", "70000"),
        ("callback_allowlist", "10.0.0.0/33"),
    ],
)
def test_out_of_range_values_raise_config_error(name: str, value: str) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env(env(**{name: value}))
