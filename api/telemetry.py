"""Request metrics and logging for the API (wired by the app factory)."""

from __future__ import annotations

import time

from flask import Flask, Response, g, request

from dispatcher import metrics
from dispatcher.config import Settings


def install(app: Flask, settings: Settings) -> None:
    """Time every request and count it by URL rule (never by path: ids are unbounded)."""
    metrics.configure(settings)

    @app.before_request
    def _start() -> None:
        g.metrics_started = time.perf_counter()

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
