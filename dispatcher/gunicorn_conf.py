"""gunicorn settings for the API (``gunicorn -c python:dispatcher.gunicorn_conf``).

Logs in Dispatcher's format with an access line that never carries the query
string (API keys travel as ``?key=``), and multiprocess metrics cleaned up
when a worker exits.
"""

from __future__ import annotations

from typing import Any

from dispatcher import logs, metrics
from dispatcher.config import Settings

_settings = Settings.from_env()

accesslog = "-"
access_log_format = logs.ACCESS_LOG_FORMAT
logconfig_dict = logs.gunicorn_logconfig(_settings.log_format, _settings.log_level)


def child_exit(_server: Any, worker: Any) -> None:
    """A gunicorn worker died or was replaced: its live gauges go with it."""
    metrics.process_exited(worker.pid)
