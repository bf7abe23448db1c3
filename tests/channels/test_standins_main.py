"""`python -m tests.standins`, the local trial of the rich channels the README documents."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any
from urllib.parse import parse_qsl

import pytest
from twilio.request_validator import RequestValidator

from dispatcher.channels import registry
from dispatcher.channels.base import OutboundMessage, Outcome
from dispatcher.config import Settings
from tests.helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]


class Recorder:
    """Dispatcher's vendor webhooks, as a server that keeps what it is sent."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                recorder.posts.append((self.path, dict(self.headers), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture()
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.close()


@pytest.fixture()
def env(recorder: Recorder, tmp_path: Path) -> Iterator[dict[str, str]]:
    ports = [str(free_port()) for _ in range(3)]
    args = ["--api", recorder.url, "--dir", str(tmp_path), "--delay", "0.1", "--lifetime", "60"]
    args += ["--rbm-port", ports[0], "--whatsapp-port", ports[1], "--twilio-port", ports[2]]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.standins", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("RBM http://127.0.0.1:"), first
        text = (tmp_path / "carriers.env").read_text()
        yield dict(
            shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in text.splitlines()
        )
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def message(channel: str, rid: str) -> OutboundMessage:
    return OutboundMessage(rid, channel, "+447700900123", "+15005550006", "hello")


def test_the_written_settings_pass_the_start_check_and_statuses_come_back_signed(
    env: dict[str, str], recorder: Recorder, tmp_path: Path
) -> None:
    settings = Settings.from_env(env, var_dir=str(tmp_path))
    providers = {
        name: registry.build(name, settings=settings, redis_client=None)
        for name in ("rbm", "whatsapp_cloud", "twilio")
    }
    sent = {
        "rbm": providers["rbm"].send(message("rcs", "r-rcs")),
        "whatsapp_cloud": providers["whatsapp_cloud"].send(message("whatsapp", "r-wa")),
        "twilio": providers["twilio"].send(message("sms", "r-sms")),
    }
    assert {r.outcome for r in sent.values()} == {Outcome.ACCEPTED}
    # RBM: DELIVERED and READ; WhatsApp: delivered; Twilio: delivered.
    wait_for(lambda: len(recorder.posts) >= 4, timeout=30)
    by_path: dict[str, list[tuple[dict[str, str], bytes]]] = {}
    for path, headers, body in recorder.posts:
        by_path.setdefault(path, []).append(({k.lower(): v for k, v in headers.items()}, body))
    for headers, body in by_path["/providers/rbm/events"]:
        data = base64.b64decode(json.loads(body)["message"]["data"])
        digest = hmac.new(settings.rbm_client_token.encode(), data, hashlib.sha512).digest()
        assert headers["x-goog-signature"] == base64.b64encode(digest).decode()
        assert json.loads(data)["messageId"] == "r-rcs"
    [(headers, body)] = by_path["/providers/whatsapp/webhook"]
    expected = hmac.new(settings.whatsapp_app_secret.encode(), body, hashlib.sha256).hexdigest()
    assert headers["x-hub-signature-256"] == f"sha256={expected}"
    [(headers, body)] = by_path["/providers/twilio/status"]
    form = dict(parse_qsl(body.decode()))
    assert form["MessageSid"] == sent["twilio"].provider_message_id
    assert RequestValidator(settings.twilio_auth_token).validate(
        f"{recorder.url}/providers/twilio/status",
        form,
        headers["x-twilio-signature"],
    )
