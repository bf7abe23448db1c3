"""Operational endpoints: health, Prometheus metrics, the OpenAPI document and its browsable page.

``/health/live`` says the process answers; ``/health/ready`` that the database, Redis
and a worker on every queue are there; ``/health`` checks the database and Redis
only (as it always has), so a load balancer can keep using it while workers restart.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, request
from marshmallow import Schema, fields, validate
from swagger_ui_bundle import swagger_ui_path

from api import context as ctx
from api import openapi
from api.errors import register_on
from dispatcher import health, metrics
from dispatcher.errors import NotFound, Unauthenticated

blueprint = Blueprint("ops", __name__)
register_on(blueprint)

OURS = Path(__file__).with_name("static") / "docs"
# Swagger UI's files /docs serves (from the swagger-ui-bundle package): nothing else.
SWAGGER_FILES = frozenset(
    {
        "swagger-ui.css",
        "swagger-ui-bundle.js",
        "swagger-ui-standalone-preset.js",
        "favicon-32x32.png",
        "favicon-16x16.png",
    }
)


class HealthReply(Schema):
    """The state of each part checked; ``failing`` names those that are not ok."""

    status = fields.String(required=True, validate=validate.OneOf(("ok", "unavailable")))
    checks = fields.Dict(keys=fields.String(), values=fields.String(), required=True)
    failing = fields.List(fields.String(), required=True)


def _health(*, workers: bool) -> tuple[dict[str, Any], int]:
    rt = ctx.runtime()
    report = health.check(sessions=rt.sessions, client=rt.redis, workers=workers)
    status = "ok" if report.ok else "unavailable"
    body = {"status": status, "checks": report.checks, "failing": report.failing}
    return HealthReply().dump(body), 200 if report.ok else 503


@blueprint.get("/health")
def health_check() -> tuple[dict[str, Any], int]:
    return _health(workers=False)


@blueprint.get("/health/ready")
def ready() -> tuple[dict[str, Any], int]:
    return _health(workers=True)


@blueprint.get("/health/live")
def live() -> dict[str, Any]:
    return HealthReply().dump({"status": "ok", "checks": {"process": "ok"}, "failing": []})


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


@blueprint.get("/openapi.json")
def openapi_document() -> dict[str, Any]:
    document = current_app.extensions.get("openapi")
    if document is None:
        document = current_app.extensions["openapi"] = openapi.build(ctx.settings())
    return document


def _file(path: Path) -> Response:
    # Read whole (the largest is about 1 MB): nothing is left open if a client goes away.
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    response = Response(path.read_bytes(), mimetype=kind)
    response.cache_control.max_age = 300
    return response


@blueprint.get("/docs")
def docs() -> Response:
    return _file(OURS / "index.html")


@blueprint.get("/docs/<name>")
def docs_asset(name: str) -> Response:
    if name in SWAGGER_FILES:
        return _file(Path(swagger_ui_path) / name)
    if name == "dispatcher-init.js":
        return _file(OURS / name)
    raise NotFound(f"no such file: {name}")
