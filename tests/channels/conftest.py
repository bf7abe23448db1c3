"""Fixtures of the provider tests: the API live on a real port, with some settings changed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dispatcher.config import Settings
from dispatcher.runtime import Runtime
from tests.helpers import RecordingPublisher, free_port
from tests.helpers.providers import Live


@pytest.fixture()
def live_factory(
    settings: Settings, publisher: RecordingPublisher
) -> Iterator[Callable[..., Live]]:
    """Start the API with some settings changed (the vendors' secrets, mostly)."""
    started: list[Live] = []

    def start(**overrides: Any) -> Live:
        # Vendors are told the API's public URL (Twilio signs it): here, its own port.
        port = free_port()
        overrides.setdefault("public_base_url", f"http://127.0.0.1:{port}")
        live = Live(Runtime(settings.replace(**overrides), publisher), port)
        started.append(live)
        return live

    yield start
    for live in started:
        live.close()
