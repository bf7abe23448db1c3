"""`dispatcher run` refuses to start on ports that something else holds, naming the setting."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher.config import Settings
from dispatcher.devserver import serve, taken_ports
from tests.helpers import free_port


@pytest.fixture
def held() -> Iterator[int]:
    """A port on 127.0.0.1 that another program listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield int(other.getsockname()[1])


def ports(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "var_dir": str(tmp_path / "var"),
        "api_port": free_port(),
        "flower_port": free_port(),
        "redis_url": f"redis://127.0.0.1:{free_port()}/0",
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


def test_free_ports_are_not_reported(tmp_path: Path) -> None:
    assert taken_ports(ports(tmp_path)) == []


@pytest.mark.parametrize(
    ("field", "setting"),
    [
        ("api_port", "DISPATCHER_API_PORT"),
        ("flower_port", "DISPATCHER_FLOWER_PORT"),
        ("redis_url", "DISPATCHER_REDIS_URL"),
    ],
)
def test_a_held_port_is_named_with_the_setting_that_moves_it(
    tmp_path: Path, held: int, field: str, setting: str
) -> None:
    value = f"redis://127.0.0.1:{held}/0" if field == "redis_url" else held
    assert taken_ports(ports(tmp_path, **{field: value})) == [
        f"127.0.0.1:{held} is in use (set {setting} to move it)"
    ]


def test_an_external_redis_port_is_not_ours_to_hold(tmp_path: Path, held: int) -> None:
    external = ports(tmp_path, redis_url=f"redis://127.0.0.1:{held}/0", embedded_redis=False)
    assert taken_ports(external) == []


def test_run_stops_before_starting_anything(
    tmp_path: Path, held: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert serve(ports(tmp_path, api_port=held)) == 1
    assert capsys.readouterr().out == (
        f"[dispatcher] cannot start: 127.0.0.1:{held} is in use (set DISPATCHER_API_PORT "
        "to move it)\n"
    )
    assert not (tmp_path / "var").exists()
