"""Operational endpoints: health and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request
from sqlalchemy import text

from api import context as ctx
from dispatcher import metrics
from dispatcher.errors import NotFound, Unauthenticated

blueprint = Blueprint("ops", __name__)


@blueprint.get("/health")
def health() -> tuple[dict[str, Any], int]:
    ctx.session().execute(text("select 1"))
    ctx.runtime().redis.ping()
    return {"status": "ok"}, 200


@blueprint.get("/metrics", endpoint="metrics")
def metrics_view() -> Response:
    # Bearer token (DISPATCHER_METRICS_TOKEN); without one configured, not served at all.
    rt = ctx.runtime()
    if not rt.settings.metrics_token:
        raise NotFound("metrics are off: set DISPATCHER_METRICS_TOKEN")
    if not metrics.token_ok(
        expected=rt.settings.metrics_token, authorization=request.headers.get("Authorization")
    ):
        raise Unauthenticated("metrics need Authorization: Bearer <DISPATCHER_METRICS_TOKEN>")
    body, content_type = metrics.exposition(metrics.backlog_for(rt))
    return Response(body, content_type=content_type)
