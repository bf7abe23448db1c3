"""Providers per channel by name, and their secrets from the environment or files."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatcher.channels.rbm import RbmProvider
from dispatcher.channels.simulator import Simulator
from dispatcher.channels.twilio import TwilioProvider
from dispatcher.channels.whatsapp_cloud import WhatsAppCloudProvider
from dispatcher.config import ConfigError, Settings
from dispatcher.runtime import Runtime
from tests.helpers import RecordingPublisher

ENV = {
    "DISPATCHER_CHANNEL_PROVIDERS": '{"rcs": "rbm", "whatsapp": "whatsapp_cloud", "sms": "twilio"}',
    "DISPATCHER_RBM_AGENT_ID": "agent@rbm.goog",
    "DISPATCHER_WHATSAPP_PHONE_NUMBER_ID": "1065",
    "DISPATCHER_TWILIO_ACCOUNT_SID": "AC123",
    "DISPATCHER_PUBLIC_BASE_URL": "https://dispatcher.example.com/",
    "DISPATCHER_RBM_CLIENT_TOKEN": "rbm-client-token",
    "DISPATCHER_WHATSAPP_APP_SECRET": "wa-app-secret",
}


def secrets(tmp_path: Path) -> dict[str, str]:
    key = tmp_path / "key.json"
    key.write_text('{"client_email": "a@b", "private_key": "k", "token_uri": "https://t"}')
    token = tmp_path / "twilio-token"
    token.write_text("twilio-secret-from-a-file\n")
    return {
        "DISPATCHER_RBM_SERVICE_ACCOUNT_FILE": str(key),
        "DISPATCHER_TWILIO_AUTH_TOKEN_FILE": str(token),
        "DISPATCHER_WHATSAPP_TOKENS": '{"1065": "wa-secret-token"}',
    }


def test_each_channel_gets_the_provider_it_names(tmp_path: Path, redis_url: str) -> None:
    settings = Settings.from_env(
        {**ENV, **secrets(tmp_path)}, var_dir=str(tmp_path), redis_url=redis_url
    )
    rt = Runtime(settings, RecordingPublisher())
    providers = rt.providers
    assert isinstance(providers["rcs"], RbmProvider)
    assert isinstance(providers["whatsapp"], WhatsAppCloudProvider)
    assert isinstance(providers["sms"], TwilioProvider)
    assert providers["sms"].status_callback == (
        "https://dispatcher.example.com/providers/twilio/status"
    )
    rt.dispose()


def test_unnamed_channels_keep_the_default_provider_and_share_one_instance(
    tmp_path: Path, redis_url: str
) -> None:
    settings = Settings(
        var_dir=str(tmp_path),
        redis_url=redis_url,
        channel_providers={"whatsapp": "twilio"},
        twilio_account_sid="AC1",
        twilio_auth_token="t",
        public_base_url="https://dispatcher.example.com",
    )
    rt = Runtime(settings, RecordingPublisher())
    assert isinstance(rt.providers["sms"], Simulator)
    assert rt.providers["sms"] is rt.providers["rcs"]
    assert isinstance(rt.providers["whatsapp"], TwilioProvider)
    rt.dispose()


def test_secrets_come_from_files_and_never_show_in_repr(tmp_path: Path) -> None:
    settings = Settings.from_env({**ENV, **secrets(tmp_path)}, var_dir=str(tmp_path))
    assert settings.twilio_auth_token == "twilio-secret-from-a-file"
    text = repr(settings)
    for secret in ("twilio-secret-from-a-file", "wa-secret-token"):
        assert secret not in text


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"DISPATCHER_CHANNEL_PROVIDERS": '{"rcs": "carrier-pigeon"}'},
            r"CHANNEL_PROVIDERS\[rcs\]",
        ),
        ({"DISPATCHER_CHANNEL_PROVIDERS": '{"fax": "twilio"}'}, "unknown channels"),
        ({"DISPATCHER_PROVIDER": "rbm2"}, "DISPATCHER_PROVIDER"),
        ({"DISPATCHER_TWILIO_AUTH_TOKEN_FILE": "/nonexistent/token"}, "cannot read"),
    ],
)
def test_bad_provider_settings_are_refused(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env, var_dir=str(tmp_path))


@pytest.mark.parametrize(
    ("drop", "names"),
    [
        ("DISPATCHER_RBM_AGENT_ID", ["rbm provider (channel rcs)", "DISPATCHER_RBM_AGENT_ID"]),
        ("DISPATCHER_RBM_CLIENT_TOKEN", ["DISPATCHER_RBM_CLIENT_TOKEN (delivery and read"]),
        ("DISPATCHER_RBM_SERVICE_ACCOUNT_FILE", ["DISPATCHER_RBM_SERVICE_ACCOUNT_FILE"]),
        ("DISPATCHER_WHATSAPP_TOKENS", ["whatsapp_cloud provider", "DISPATCHER_WHATSAPP_TOKENS"]),
        ("DISPATCHER_WHATSAPP_PHONE_NUMBER_ID", ["DISPATCHER_WHATSAPP_PHONE_NUMBER_ID or"]),
        ("DISPATCHER_WHATSAPP_APP_SECRET", ["DISPATCHER_WHATSAPP_APP_SECRET"]),
        ("DISPATCHER_TWILIO_ACCOUNT_SID", ["twilio provider (channel sms)", "_ACCOUNT_SID"]),
        ("DISPATCHER_TWILIO_AUTH_TOKEN_FILE", ["DISPATCHER_TWILIO_AUTH_TOKEN (its auth token)"]),
        ("DISPATCHER_PUBLIC_BASE_URL", ["DISPATCHER_PUBLIC_BASE_URL (where Twilio posts"]),
    ],
)
def test_a_provider_missing_a_setting_stops_the_process_at_start_naming_it(
    tmp_path: Path, drop: str, names: list[str]
) -> None:
    # Before, the process started, took batches and left every message of the channel
    # queued while each send task raised ValueError.
    env = {k: v for k, v in {**ENV, **secrets(tmp_path)}.items() if k != drop}
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(env, var_dir=str(tmp_path))
    for name in names:
        assert name in str(refused.value)
    for secret in ("wa-secret-token", "twilio-secret-from-a-file", "rbm-client-token"):
        assert secret not in str(refused.value)


def test_a_whatsapp_sender_without_a_token_is_named(tmp_path: Path) -> None:
    env = {**ENV, **secrets(tmp_path), "DISPATCHER_WHATSAPP_SENDERS": '{"Acme": "2077"}'}
    with pytest.raises(ConfigError, match="an access token for phone number id 2077"):
        Settings.from_env(env, var_dir=str(tmp_path))


def test_an_unreadable_service_account_key_is_named_at_start(tmp_path: Path) -> None:
    env = {**ENV, **secrets(tmp_path)}
    (tmp_path / "key.json").write_text('{"client_email": "a@b"}')
    with pytest.raises(ConfigError, match="key lacks private_key, token_uri"):
        Settings.from_env(env, var_dir=str(tmp_path))


def test_the_http_provider_needs_its_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="channel sms, rcs, whatsapp\\) needs DISPATCHER_HTTP"):
        Settings(var_dir=str(tmp_path), provider="http")
    assert Settings(var_dir=str(tmp_path), provider="http", http_provider_url="http://c/x")
