"""Operational endpoints: health and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api import context as ctx

blueprint = Blueprint("ops", __name__)


@blueprint.get("/health")
def health() -> tuple[dict[str, Any], int]:
    ctx.session().execute(text("select 1"))
    ctx.runtime().redis.ping()
    return {"status": "ok"}, 200


@blueprint.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)
