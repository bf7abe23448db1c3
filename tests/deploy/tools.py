"""Debian's prometheus package for the deploy tests: found, or skipped (required when CI=true)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def binary(name: str) -> str:
    """The path of ``name`` (prometheus or promtool); skips, or fails under CI=true."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {name} is missing: `make test` installs Debian's prometheus")
    pytest.skip(f"{name} not installed (apt-get install prometheus)")
