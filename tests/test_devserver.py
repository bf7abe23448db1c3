"""`dispatcher run` (what `make run` starts): up on 127.0.0.1, serves, and Ctrl-C leaves nothing.

Runs the real supervisor in a subprocess on free ports with its own var/ dir:
embedded Redis, migrations, demo account, gunicorn, workers, beat and Flower.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

import pytest
import requests

from dispatcher.config import Settings
from dispatcher.devserver import _again, providers_line
from dispatcher.supervisor import Child, Restarts
from tests.helpers import free_port, wait_for

pytestmark = pytest.mark.system
ROOT = Path(__file__).resolve().parents[1]


def _gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_run_serves_the_readme_example_and_sigint_stops_every_process(tmp_path: Path) -> None:
    api, flower, redis_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env.update(
        DISPATCHER_VAR_DIR=str(tmp_path / "var"),
        DISPATCHER_API_PORT=str(api),
        DISPATCHER_FLOWER_PORT=str(flower),
        DISPATCHER_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        DISPATCHER_SIMULATOR='{"receipt_delay": 0.2}',
        DISPATCHER_SEND_CONCURRENCY="1",
        DISPATCHER_CALLBACK_CONCURRENCY="1",
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", "from dispatcher.cli import main; main()", "run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=_read, args=(proc.stdout, lines), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("Ctrl-C stops everything" in line for line in lines), timeout=90)
        var = tmp_path / "var"
        key = (var / "demo-api-key").read_text().strip()
        assert (var / "demo-account-id").read_text().strip()
        assert (var / "demo-webhook-secret").read_text().startswith("whsec_")
        base = f"http://127.0.0.1:{api}"
        wait_for(lambda: _get(f"{base}/health") == 200, timeout=60)
        reply = requests.post(
            f"{base}/batch?key={key}",
            timeout=10,
            json={
                "from": "Dispatcher",
                "message": "Hello from Dispatcher",
                "destinations": ["447700900123", "447700900124"],
            },
        )
        assert reply.status_code == 200, reply.text
        batch_id = reply.json()["identifier"]

        def delivered() -> bool:
            status = requests.get(
                f"{base}/batch/{batch_id}", timeout=10, headers={"Authorization": f"Bearer {key}"}
            ).json()
            return bool(status["counts"]["delivered"] == 2)

        wait_for(delivered, timeout=60)
        assert _get(f"http://127.0.0.1:{flower}/") == 200
        started = [
            int(m.group(1))
            for line in lines
            if (m := re.search(r"started [\w-]+ \(pid (\d+)\)", line))
        ]
        assert len(started) == 7  # redis, api, three workers, beat, flower
        assert "  channels sms, rcs, whatsapp simulator (simulated: nothing is sent)\n" in lines
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=90)
        reader.join(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()
    assert code == 0
    # Every child ran in its own process group (pool processes included): all gone.
    assert all(_gone(pid) for pid in started)


def _read(stream: IO[bytes], lines: list[str]) -> None:
    for raw in stream:
        lines.append(raw.decode(errors="replace"))


def _get(url: str) -> int:
    try:
        return requests.get(url, timeout=5).status_code
    except requests.RequestException:
        return 0


def test_a_process_that_exits_is_started_again_but_not_redis_nor_a_crash_loop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argvs = {"send-worker": [sys.executable, "-c", "raise SystemExit(1)"]}
    started: list[str] = []
    restarts = Restarts(limit=2, window=60.0)

    def start(name: str, argv: list[str]) -> None:
        assert argv == argvs[name]
        started.append(name)

    def exited(name: str) -> Child:
        child = Child(name, [sys.executable, "-c", "raise SystemExit(1)"], env=os.environ)
        child.proc.wait(timeout=20)
        return child

    assert _again(start, argvs, restarts, exited("send-worker"))
    assert _again(start, argvs, restarts, exited("send-worker"))
    assert not _again(start, argvs, restarts, exited("send-worker"))  # a crash loop
    assert not _again(start, argvs, restarts, exited("redis"))  # everything needs it
    assert started == ["send-worker", "send-worker"]
    said = capsys.readouterr().out
    assert said.count("send-worker exited with 1; starting it again") == 2
    assert "send-worker exited with 1; stopping" in said and "redis exited with 1; stopping" in said


def test_the_banner_names_each_channel_s_provider_and_flags_the_simulated_ones() -> None:
    # Before, a deployment giving sms to Twilio left rcs and whatsapp on the simulator
    # without a word: their messages were "delivered" to nobody.
    settings = Settings(
        channel_providers={"sms": "http"}, http_provider_url="http://127.0.0.1:9/send"
    )
    assert providers_line(settings) == (
        "  channels sms http; rcs, whatsapp simulator (simulated: nothing is sent)\n"
    )
