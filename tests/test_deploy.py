"""docker-compose.yml runs the same entry points as `make run`, production-shaped."""

from __future__ import annotations

import os
import shutil
import subprocess
import types
from pathlib import Path

import pytest
import yaml

from dispatcher.config import Settings
from dispatcher.devserver import commands

ROOT = Path(__file__).resolve().parents[1]
# With the smpp provider, make run also starts the connector.
SMPP = {
    "carriers": {
        "c": {
            "connections": [
                {"name": "c1", "host": "smsc", "port": 2775, "system_id": "s", "password": "p"}
            ]
        }
    }
}


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
        "dispatch-worker",
        "send-worker",
        "callback-worker",
        "beat",
        "flower",
        "smpp-connector",
    } <= set(services)
    local = commands(Settings(provider="smpp", smpp=SMPP))
    for name in (
        "api",
        "dispatch-worker",
        "send-worker",
        "callback-worker",
        "beat",
        "flower",
        "smpp-connector",
    ):
        ours = [Path(w).name for w in local[name]]
        theirs = words(services[name]["command"])
        # Same program and the same app / queues (flags for ports and sizes may differ).
        assert theirs[0] == ours[0], name
        for token in (
            "api.wsgi:app",
            "workers.main",
            "dispatch",
            "send",
            "callbacks",
            "beat",
            "smpp-connector",
        ):
            if token in ours:
                assert token in theirs, (name, token)
    assert words(services["migrate"]["command"]) == ["dispatcher", "db", "upgrade"]


def test_production_settings_persist_and_authenticate() -> None:
    services = compose()["services"]
    assert "--appendonly" in words(services["redis"]["command"])
    assert "--basic-auth" in " ".join(words(services["flower"]["command"]))
    text = (ROOT / "docker-compose.yml").read_text()
    assert "POSTGRES_PASSWORD:?" in text  # no default password in the repo
    for name in ("dispatch-worker", "send-worker", "callback-worker"):
        assert "container_name" not in services[name]  # so --scale works


def test_every_carrier_setting_reaches_the_containers_and_only_when_set() -> None:
    """A carrier chosen in the shell or .env must reach the processes (they stop at start
    naming a missing setting); one not set stays unset, so its default holds."""
    env = compose()["x-app-env"]
    carrier = [
        f.upper()
        for f in Settings.__dataclass_fields__
        if f.startswith(("rbm_", "whatsapp_", "twilio_", "http_provider_"))
        or f in ("channels", "channel_providers", "public_base_url", "dlr_secrets")
    ]
    assert len(carrier) >= 20
    for name in carrier:
        assert f"DISPATCHER_{name}" in env, name
        assert env[f"DISPATCHER_{name}"] is None, name  # no value: from the shell, or unset


def compose_tool() -> list[str] | None:
    """A compose command that works here, probed with ``version``, or None."""
    candidates = [["docker", "compose"], ["docker-compose"]]
    for tool in candidates:
        if not shutil.which(tool[0]):
            continue
        try:
            probe = subprocess.run(
                [*tool, "version"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        # Docker 28 without the plugin says "unknown command: docker compose"; older
        # ones "'compose' is not a docker command": either way, a non-zero exit.
        if probe.returncode == 0:
            return tool
    return None


def test_compose_config_is_valid() -> None:
    tool = compose_tool()
    if tool is None:
        pytest.skip("no docker compose plugin nor docker-compose here")
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
    assert result.returncode == 0, result.stderr


def test_gunicorn_runs_with_the_same_settings_everywhere() -> None:
    """make run, compose and the image's default command share dispatcher/gunicorn_conf.py."""
    local = commands(Settings())["api"]
    assert "python:dispatcher.gunicorn_conf" in local
    assert "python:dispatcher.gunicorn_conf" in words(compose()["services"]["api"]["command"])
    assert '"python:dispatcher.gunicorn_conf"' in (ROOT / "Dockerfile").read_text()


# The kernel's CFS weight of a niceness (kernel/sched/core.c, sched_prio_to_weight), 0-19.
CFS_WEIGHT = [
    1024,
    820,
    655,
    526,
    423,
    335,
    272,
    215,
    172,
    137,
    110,
    87,
    70,
    56,
    45,
    36,
    29,
    23,
    18,
    15,
]


def test_gunicorn_reads_every_setting_of_the_conf_and_opens_no_shared_control_socket() -> None:
    """Each name the conf sets is one of gunicorn's settings (a misspelt one is silently
    ignored), and the per-user control socket is off: APIs on one host would share it."""
    from gunicorn.config import Config

    from dispatcher import gunicorn_conf

    cfg = Config()
    ours = {
        k
        for k, v in vars(gunicorn_conf).items()
        if not k.startswith("_") and k.islower() and not isinstance(v, types.ModuleType)
    }
    hooks = {k for k in ours if callable(getattr(gunicorn_conf, k))}
    values = ours - hooks - {"annotations"}
    assert values <= set(cfg.settings), values - set(cfg.settings)
    for name in values | hooks:
        cfg.set(name, getattr(gunicorn_conf, name))
    assert cfg.control_socket_disable is True


def test_compose_cpu_shares_order_the_services_as_the_default_process_nice() -> None:
    """Each container is its own cgroup, where niceness orders nothing between services:
    the cgroup weight (cpu_shares, default 1024) carries the default niceness instead."""
    services = compose()["services"]
    roles = {
        "api": "api",
        "dispatch-worker": "dispatch",
        "send-worker": "send",
        "callback-worker": "callbacks",
        "beat": "beat",
    }
    nice = Settings().process_nice
    shares = {name: services[name].get("cpu_shares", 1024) for name in roles}
    assert shares == {name: CFS_WEIGHT[nice.get(role, 0)] for name, role in roles.items()}


def test_make_run_starts_as_many_api_workers_as_the_setting_says() -> None:
    assert Settings().api_workers == 3
    for n in (1, 5):
        api = commands(Settings(api_workers=n))["api"]
        assert api[api.index("--workers") + 1] == str(n)
