"""Providers by name: what Settings can select per channel (and a route table by name).

``build(name, settings=, redis_client=, wake=)`` makes one provider from the settings;
the runtime builds each name once and maps channels to them. ``wake`` asks for the
receipts task at a time (``dispatcher/receipts/wake.py``), for a provider that holds
receipts until they are due.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import requests

from dispatcher.channels.base import Provider
from dispatcher.config import Settings

NAMES = frozenset({"simulator", "http", "smpp", "rbm", "whatsapp_cloud", "twilio"})
# Providers that send binary SMS (8-bit data and a UDH): the others carry text only.
BINARY = frozenset({"smpp"})
# Providers whose receipts wait in Redis for a worker to apply them (due_receipts): the
# others' come by webhook, applied by the API.
HOLD_RECEIPTS = frozenset({"simulator", "smpp"})


def carries_binary(settings: Settings, channel: str) -> bool:
    """Whether the provider ``settings`` name for ``channel`` sends binary SMS as binary."""
    return settings.channel_providers.get(channel, settings.provider) in BINARY


def selected(settings: Settings) -> dict[str, str]:
    """The provider name carrying each configured channel."""
    return {c: settings.channel_providers.get(c, settings.provider) for c in settings.channels}


def _rbm_needs(settings: Settings) -> list[str]:
    from dispatcher.channels.rbm import CredentialsError, read_key

    needs = [
        f"{var} ({why})"
        for var, value, why in (
            ("DISPATCHER_RBM_AGENT_ID", settings.rbm_agent_id, "the agent that sends"),
            (
                "DISPATCHER_RBM_CLIENT_TOKEN",
                settings.rbm_client_token,
                "delivery and read events come only through its webhook",
            ),
        )
        if not value
    ]
    if not settings.rbm_service_account_file:
        needs.append("DISPATCHER_RBM_SERVICE_ACCOUNT_FILE (the service account's JSON key)")
    else:
        try:
            read_key(settings.rbm_service_account_file)
        except CredentialsError as exc:
            needs.append(f"DISPATCHER_RBM_SERVICE_ACCOUNT_FILE: {exc}")
    return needs


def _whatsapp_needs(settings: Settings) -> list[str]:
    needs = []
    numbers = {settings.whatsapp_phone_number_id, *settings.whatsapp_senders.values()} - {""}
    if not numbers:
        needs.append(
            "DISPATCHER_WHATSAPP_PHONE_NUMBER_ID or DISPATCHER_WHATSAPP_SENDERS "
            "(the phone number id that sends)"
        )
    untokened = sorted(numbers - set(settings.whatsapp_tokens))
    if not settings.whatsapp_tokens or untokened:
        which = f" for phone number id {', '.join(untokened)}" if untokened else ""
        needs.append(f"DISPATCHER_WHATSAPP_TOKENS (an access token{which})")
    if not settings.whatsapp_app_secret:
        needs.append(
            "DISPATCHER_WHATSAPP_APP_SECRET (statuses come only through the webhook it signs)"
        )
    return needs


def _twilio_needs(settings: Settings) -> list[str]:
    return [
        f"{var} ({why})"
        for var, value, why in (
            ("DISPATCHER_TWILIO_ACCOUNT_SID", settings.twilio_account_sid, "the account"),
            ("DISPATCHER_TWILIO_AUTH_TOKEN", settings.twilio_auth_token, "its auth token"),
            (
                "DISPATCHER_PUBLIC_BASE_URL",
                settings.public_base_url,
                "where Twilio posts statuses: without it no message gets its receipt",
            ),
        )
        if not value
    ]


def _http_needs(settings: Settings) -> list[str]:
    if settings.http_provider_url:
        return []
    return ["DISPATCHER_HTTP_PROVIDER_URL (the carrier's endpoint)"]


_NEEDS: dict[str, Callable[[Settings], list[str]]] = {
    "rbm": _rbm_needs,
    "whatsapp_cloud": _whatsapp_needs,
    "twilio": _twilio_needs,
    "http": _http_needs,
}


def missing(settings: Settings) -> list[str]:
    """What each selected provider lacks from ``settings``, one sentence per provider.

    Checked when a process starts (Settings), so that a provider nobody configured
    stops the process instead of leaving every message of its channels queued.
    """
    channels: dict[str, list[str]] = {}
    for channel, name in selected(settings).items():
        channels.setdefault(name, []).append(channel)
    out = []
    for name, on in channels.items():
        needs = _NEEDS.get(name, lambda _: [])(settings)
        if needs:
            out.append(f"the {name} provider (channel {', '.join(on)}) needs {'; '.join(needs)}")
    return out


def _vendor(settings: Settings, api_url: str) -> dict[str, Any]:
    """What every vendor's HTTP provider takes: its API's URL, a session of its own, timeouts."""
    session = requests.Session()
    session.headers["User-Agent"] = "Dispatcher/1"
    timeout = (settings.http_connect_timeout, settings.http_read_timeout)
    return {"api_url": api_url, "session": session, "timeout": timeout}


def build(
    name: str,
    *,
    settings: Settings,
    redis_client: Any,
    wake: Callable[[float], None] | None = None,
) -> Provider:
    """The provider called ``name``, configured from ``settings``."""
    if name == "simulator":
        from dispatcher.channels.simulator import Simulator

        return Simulator(redis_client=redis_client, rules=settings.simulator, wake=wake)
    if name == "http":
        from dispatcher.channels.http import HttpProvider

        return HttpProvider(
            url=settings.http_provider_url,
            token=settings.http_provider_token,
            connect_timeout=settings.http_connect_timeout,
            read_timeout=settings.http_read_timeout,
        )
    if name == "smpp":
        from dispatcher.channels.smpp.provider import SmppProvider

        return SmppProvider(redis_client=redis_client, config=settings.smpp_config())
    if name == "rbm":
        from dispatcher.channels.rbm import RbmProvider, ServiceAccountTokens

        if not settings.rbm_service_account_file:
            raise ValueError("the rbm provider needs DISPATCHER_RBM_SERVICE_ACCOUNT_FILE")
        vendor = _vendor(settings, settings.rbm_api_url)
        tokens = ServiceAccountTokens.from_file(
            settings.rbm_service_account_file, session=vendor["session"], timeout=vendor["timeout"]
        )
        return RbmProvider(
            agent_id=settings.rbm_agent_id, tokens=tokens, ttl=settings.rbm_ttl, **vendor
        )
    if name == "whatsapp_cloud":
        from dispatcher.channels.whatsapp_cloud import WhatsAppCloudProvider

        return WhatsAppCloudProvider(
            tokens=settings.whatsapp_tokens,
            phone_number_id=settings.whatsapp_phone_number_id,
            senders=settings.whatsapp_senders,
            **_vendor(settings, settings.whatsapp_api_url),
        )
    if name == "twilio":
        from dispatcher.channels.twilio import STATUS_PATH, TwilioProvider

        base = settings.public_base_url.rstrip("/")
        return TwilioProvider(
            account_sid=settings.twilio_account_sid,
            auth_token=settings.twilio_auth_token,
            status_callback=f"{base}{STATUS_PATH}" if base else "",
            messaging_service_sid=settings.twilio_messaging_service_sid,
            **_vendor(settings, settings.twilio_api_url),
        )
    raise ValueError(f"unknown provider {name!r}")
