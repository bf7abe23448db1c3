"""System-test fixtures: the embedded default (SQLite) with real Celery processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.config import Settings
from dispatcher.runtime import Runtime
from tests.engine import system
from tests.helpers import make_settings


@pytest.fixture(scope="module")
def sys_settings(
    request: pytest.FixtureRequest,
    sqlite_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Settings:
    """The system tests' settings; a module changes some with a ``SYS_SETTINGS`` dict."""
    return make_settings(
        database_url=sqlite_url,
        redis_url=redis_url,
        var=tmp_path_factory.mktemp("sysvar"),
        **getattr(request.module, "SYS_SETTINGS", {}),
    )


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def live(sys_settings: Settings) -> Iterator[Runtime]:
    """The runtime of the test process, publishing to the real broker."""
    with system.runtime(sys_settings) as rt:
        yield rt


@pytest.fixture(scope="module")
def live_sessions(live: Runtime) -> sessionmaker[Session]:
    return live.sessions


@pytest.fixture(scope="module")
def module_processes(live: Runtime) -> Iterator[system.Together]:
    """The module's real processes, stopped together once the fixtures that started them
    are done (one by one, each waited for its own warm shutdown)."""
    with system.Together() as processes:
        yield processes


@pytest.fixture(scope="module")
def send_worker(
    sys_settings: Settings, logs: Path, module_processes: system.Together
) -> system.Process:
    return module_processes.add(system.worker_process(sys_settings, logs, concurrency=2))


@pytest.fixture(scope="module")
def scheduler(
    sys_settings: Settings, logs: Path, module_processes: system.Together
) -> system.Process:
    return module_processes.add(system.beat_process(sys_settings, logs))
