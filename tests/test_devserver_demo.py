"""`dispatcher run`'s demo defaults yield to a setting given in a file (DISPATCHER_X_FILE)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatcher.config import Settings
from dispatcher.devserver import prepare


def test_a_setting_read_from_a_file_is_not_replaced_by_the_demo_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("CALLBACK_ALLOWLIST", "LOG_FORMAT"):
        monkeypatch.delenv(f"DISPATCHER_{name}", raising=False)
    (tmp_path / "allowlist").write_text("10.0.0.0/8\n")
    (tmp_path / "log-format").write_text("json\n")
    monkeypatch.setenv("DISPATCHER_CALLBACK_ALLOWLIST_FILE", str(tmp_path / "allowlist"))
    monkeypatch.setenv("DISPATCHER_LOG_FORMAT_FILE", str(tmp_path / "log-format"))
    configured = Settings.from_env(var_dir=str(tmp_path))
    assert configured.callback_allowlist != Settings().callback_allowlist
    prepared = prepare(configured)
    assert prepared.callback_allowlist == configured.callback_allowlist
    assert prepared.log_format == "json"
