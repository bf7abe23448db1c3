"""The throw-away PostgreSQL harness (scripts/pgtest.py) starts, serves and stops.

Skipped where PostgreSQL cannot be started, except in CI (CI=true), where
that is a failure: CI must exercise the PostgreSQL code paths.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text

try:
    from scripts.pgtest import running_postgres, unavailable_reason
except ImportError:  # pytest run without the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from scripts.pgtest import running_postgres, unavailable_reason


def _require_postgres() -> None:
    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but PostgreSQL cannot be started: {reason}")
    pytest.skip(reason)


def _port_is_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_running_postgres_serves_postgres_15_and_stops() -> None:
    _require_postgres()
    with running_postgres() as url:
        parsed = make_url(url)
        assert parsed.drivername == "postgresql+psycopg"
        assert parsed.host == "127.0.0.1"
        assert parsed.database == "dispatcher_test"
        assert parsed.port is not None
        port = parsed.port

        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("select 1")).scalar_one() == 1
                version = conn.execute(text("show server_version")).scalar_one()
                assert str(version).startswith("15"), version
        finally:
            engine.dispose()
        assert _port_is_open(port)

    assert not _port_is_open(port), f"PostgreSQL still listens on port {port}"
