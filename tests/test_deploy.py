"""docker-compose.yml runs the same entry points as `make run`, production-shaped."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dispatcher.config import Settings
from dispatcher.devserver import commands

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def words(command: str | list[str]) -> list[str]:
    return command.split() if isinstance(command, str) else list(command)


def test_every_process_of_make_run_has_a_service_with_the_same_entry_point() -> None:
    services = compose()["services"]
    assert {
        "redis",
        "postgres",
        "migrate",
        "api",
        "send-worker",
        "callback-worker",
        "beat",
        "flower",
    } <= set(services)
    local = commands(Settings())
    for name in ("api", "send-worker", "callback-worker", "beat", "flower"):
        ours = [Path(w).name for w in local[name]]
        theirs = words(services[name]["command"])
        # Same program and the same app / queues (flags for ports and sizes may differ).
        assert theirs[0] == ours[0], name
        for token in ("api.wsgi:app", "workers.main", "dispatch,send", "callbacks", "beat"):
            if token in ours:
                assert token in theirs, (name, token)
    assert words(services["migrate"]["command"]) == ["dispatcher", "db", "upgrade"]


def test_production_settings_persist_and_authenticate() -> None:
    services = compose()["services"]
    assert "--appendonly" in words(services["redis"]["command"])
    assert "--basic-auth" in " ".join(words(services["flower"]["command"]))
    text = (ROOT / "docker-compose.yml").read_text()
    assert "POSTGRES_PASSWORD:?" in text  # no default password in the repo
    for name in ("send-worker", "callback-worker"):
        assert "container_name" not in services[name]  # so --scale works


@pytest.mark.skipif(
    not (shutil.which("docker-compose") or shutil.which("docker")), reason="no compose tool here"
)
def test_compose_config_is_valid() -> None:
    tool = ["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]
    env = {
        **os.environ,
        "POSTGRES_PASSWORD": "x",
        "FLOWER_USER": "u",
        "FLOWER_PASSWORD": "p",
        "METRICS_TOKEN": "t",
        "GRAFANA_ADMIN_PASSWORD": "g",
    }
    result = subprocess.run(
        [*tool, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if (
        result.returncode
        and "docker compose" in " ".join(tool)
        and (
            "is not a docker command" in result.stderr
            # A docker CLI without the plugin reads `compose -f` as its own flags.
            or "unknown shorthand flag" in result.stderr
        )
    ):
        pytest.skip("docker CLI without the compose plugin")
    assert result.returncode == 0, result.stderr
