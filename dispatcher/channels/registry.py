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


def carries_binary(settings: Settings, channel: str) -> bool:
    """Whether the provider ``settings`` name for ``channel`` sends binary SMS as binary."""
    return settings.channel_providers.get(channel, settings.provider) in BINARY


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
