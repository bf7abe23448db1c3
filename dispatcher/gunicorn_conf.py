"""gunicorn settings for the API (``gunicorn -c python:dispatcher.gunicorn_conf``).

The API's CPU priority (``DISPATCHER_PROCESS_NICE``, dispatcher/priority.py),
logs in Dispatcher's format with an access line that never carries the query
string (API keys travel as ``?key=``), and multiprocess metrics cleaned up
when a worker exits.

The request-head limits sit above the app's own (api/errors.py), so an over-long
target or header block is answered by the app in the dialect's JSON shape rather
than by gunicorn's HTML page. 8190 is the most gunicorn allows for a request line
short of "unlimited", which it would read into memory without bound; beyond it,
api/gunicorn_worker.py answers in the native JSON shape.
"""

from __future__ import annotations

from typing import Any

from dispatcher import logs, metrics, priority
from dispatcher.config import Settings

_settings = Settings.from_env()

limit_request_line = 8190
# Over these limits gunicorn refuses before the app sees the request: this worker
# answers in the native JSON shape instead of gunicorn's HTML page.
worker_class = "api.gunicorn_worker.JsonErrorWorker"
limit_request_fields = 200
limit_request_field_size = 32 * 1024

# gunicorn 27 (what `make venv` installs today) opens a control socket at one path
# per user (~/.gunicorn/gunicorn.ctl) unless told not to: every API on the host would
# share it. Nothing here uses it; older gunicorns ignore the name.
control_socket_disable = True

accesslog = "-"
access_log_format = logs.ACCESS_LOG_FORMAT
logconfig_dict = logs.gunicorn_logconfig(_settings.log_format, _settings.log_level)


def on_starting(_server: Any) -> None:
    """The master, before any worker forks: the workers inherit the API's niceness."""
    priority.apply("api", _settings.process_nice)


def child_exit(_server: Any, worker: Any) -> None:
    """A gunicorn worker died or was replaced: its live gauges go with it."""
    metrics.process_exited(worker.pid)
