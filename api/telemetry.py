"""Request metrics and log context for the API (wired by the app factory)."""

from __future__ import annotations

import time

from flask import Flask, Response, g, request

from dispatcher import logs, metrics
from dispatcher.config import Settings

# URL parameters that are ids worth logging, and the log field each becomes.
_URL_IDS = {
    "batch_id": "batch_id",
    "callback_id": "callback_id",
    "service_plan_id": "account_id",
    "sub_account_id": "account_id",
}


def install(app: Flask, settings: Settings) -> None:
    """Time every request and count it by URL rule (never by path: ids are unbounded)."""
    metrics.configure(settings)

    @app.before_request
    def _start() -> None:
        g.metrics_started = time.perf_counter()
        # Ids in the URL go on every log line of the request.
        ids = {k: v for k, v in (request.view_args or {}).items() if k in _URL_IDS}
        g.log_context = logs.set_context(**{_URL_IDS[k]: str(v) for k, v in ids.items()})

    @app.teardown_request
    def _unbind(_exc: BaseException | None) -> None:
        token = g.pop("log_context", None)
        if token is not None:
            logs.reset_context(token)

    @app.after_request
    def _count(response: Response) -> Response:
        started = g.pop("metrics_started", None)
        if started is not None:
            rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
            metrics.http_request(
                route=rule,
                method=request.method,
                status=response.status_code,
                seconds=time.perf_counter() - started,
            )
        return response
