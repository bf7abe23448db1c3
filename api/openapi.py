"""The OpenAPI document of the three dialects, built by apispec from the marshmallow schemas.

Only the operation table below is written by hand (method, path, which schema is
the body, the query, each reply); every schema is the one the views load or dump
with. tests/test_openapi.py checks the table covers every route of the app.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask, current_app
from marshmallow import Schema, fields

import api.dialects.sinch.inbounds as sinch_inbounds
from api.dialects.mplus import schemas as mplus
from api.dialects.sinch import schemas as sinch
from dispatcher.config import Settings


class CancelledCount(Schema):
    """8x8 cancel reply (8x8 Chat Apps API)."""

    cancelledCount = fields.Integer(required=True)


class NativeError(Schema):
    """The Messaging Plus / 8x8 error shape (api/errors.py)."""

    code = fields.Integer(required=True)
    message = fields.String(required=True)
    errorId = fields.UUID(required=True)
    timestamp = fields.String(required=True)


@dataclass(frozen=True)
class Op:
    method: str
    path: str
    summary: str
    tag: str
    body: str | None = None
    query: str | None = None
    replies: dict[int, str | None] = field(default_factory=dict)
    error: str = "NativeError"


def _schemas(settings: Settings) -> dict[str, Schema | type[Schema]]:
    return {
        # Messaging Plus API
        "MplusBatch": mplus.BatchSchema(settings=settings),
        "MplusBatchQuery": mplus.BatchQuery,
        "MplusMessages": mplus.MessagesEnvelope,
        "MplusSender": mplus.SenderSchema,
        "MplusMessage": mplus.MessageSchema(settings=settings),
        "MplusPageQuery": mplus.PageQuery,
        # 8x8 Chat Apps API
        "CancelledCount": CancelledCount,
        "NativeError": NativeError,
        # Sinch SMS REST API
        "SinchSend": sinch.SendSchema(settings=settings),
        "SinchUpdate": sinch.UpdateSchema(settings=settings),
        "SinchDryRunQuery": sinch.DryRunQuery,
        "SinchListQuery": sinch.ListQuery,
        "SinchReportQuery": sinch.ReportQuery,
        "SinchFeedback": sinch.FeedbackSchema,
        # Nested schemas before the ones that nest them, so each is added once.
        "SinchBatch": sinch.BatchReply,
        "SinchBatchPage": sinch.BatchPage,
        "SinchDryRunRecipient": sinch.DryRunRecipient,
        "SinchDryRun": sinch.DryRunReply,
        "SinchStatusCount": sinch.StatusCount,
        "SinchDeliveryReport": sinch.DeliveryReport,
        "SinchRecipientDeliveryReport": sinch.RecipientDeliveryReport,
        "SinchError": sinch.ErrorReply,
        "SinchInboundQuery": sinch_inbounds.InboundQuery,
        "SinchInbound": sinch_inbounds.Inbound,
        "SinchInboundPage": sinch_inbounds.InboundPage,
    }


XMS = "/xms/v1/{service_plan_id}/batches"
S = {"error": "SinchError"}
OPERATIONS = (
    Op("post", "/batch", "Add a batch", "mplus", "MplusBatch", "MplusBatchQuery", {200: None}),
    Op(
        "post",
        "/message",
        "Send messages",
        "mplus",
        "MplusMessages",
        "MplusBatchQuery",
        {200: None},
    ),
    Op(
        "get",
        "/batch/{batch_id}",
        "Get a batch",
        "mplus",
        query="MplusPageQuery",
        replies={200: None},
    ),
    Op("delete", "/batch/{batch_id}", "Cancel a batch", "mplus", replies={200: None}),
    Op(
        "get",
        "/batch/{batch_id}/messages",
        "A batch's messages",
        "mplus",
        query="MplusPageQuery",
        replies={200: None},
    ),
    Op(
        "delete",
        "/api/v1/subaccounts/{sub_account_id}/messages/batch/{batch_id}",
        "Cancel a scheduled batch",
        "8x8",
        replies={200: "CancelledCount"},
    ),
    # Native extras (their schemas, if any, are not exported by their modules yet).
    Op("get", "/batch/{batch_id}/report", "A batch's report", "mplus", replies={200: None}),
    Op("get", "/callbacks", "List callbacks", "callbacks", replies={200: None}),
    Op(
        "post",
        "/callbacks/{callback_id}/retry",
        "Retry a callback",
        "callbacks",
        replies={200: None},
    ),
    Op("get", "/callbacks/endpoints", "Callback endpoints", "callbacks", replies={200: None}),
    Op(
        "post",
        "/callbacks/endpoints/enable",
        "Re-enable a callback endpoint",
        "callbacks",
        replies={200: None},
    ),
    Op("post", "/dlr/{provider}", "Inbound carrier receipts", "dlr", replies={200: None}),
    Op("post", "/providers/rbm/events", "Google RBM events", "providers", replies={200: None}),
    Op(
        "get", "/providers/whatsapp/webhook", "WhatsApp handshake", "providers", replies={200: None}
    ),
    Op(
        "post", "/providers/whatsapp/webhook", "WhatsApp statuses", "providers", replies={200: None}
    ),
    Op(
        "post",
        "/providers/twilio/status",
        "Twilio StatusCallback",
        "providers",
        replies={200: None},
    ),
    Op("get", "/health", "Health", "ops", replies={200: None}),
    Op(
        "get",
        "/metrics",
        "Prometheus metrics (bearer DISPATCHER_METRICS_TOKEN)",
        "ops",
        replies={200: None},
    ),
    Op("post", XMS, "Send", "sinch", "SinchSend", replies={201: "SinchBatch"}, **S),
    Op(
        "get",
        XMS,
        "List batches",
        "sinch",
        query="SinchListQuery",
        replies={200: "SinchBatchPage"},
        **S,
    ),
    Op(
        "post",
        XMS + "/dry_run",
        "Dry run",
        "sinch",
        "SinchSend",
        "SinchDryRunQuery",
        {200: "SinchDryRun"},
        **S,
    ),
    Op("get", XMS + "/{batch_id}", "Get a batch", "sinch", replies={200: "SinchBatch"}, **S),
    Op(
        "post",
        XMS + "/{batch_id}",
        "Update a batch",
        "sinch",
        "SinchUpdate",
        replies={200: "SinchBatch"},
        **S,
    ),
    Op(
        "put",
        XMS + "/{batch_id}",
        "Replace a batch",
        "sinch",
        "SinchSend",
        replies={200: "SinchBatch"},
        **S,
    ),
    Op("delete", XMS + "/{batch_id}", "Cancel a batch", "sinch", replies={200: "SinchBatch"}, **S),
    Op(
        "post",
        XMS + "/{batch_id}/delivery_feedback",
        "Delivery feedback",
        "sinch",
        "SinchFeedback",
        replies={202: None},
        **S,
    ),
    Op(
        "get",
        XMS + "/{batch_id}/delivery_report",
        "Batch delivery report",
        "sinch",
        query="SinchReportQuery",
        replies={200: "SinchDeliveryReport"},
        **S,
    ),
    Op(
        "get",
        XMS + "/{batch_id}/delivery_report/{recipient}",
        "Recipient delivery report",
        "sinch",
        replies={200: "SinchRecipientDeliveryReport"},
        **S,
    ),
    Op(
        "get",
        "/xms/v1/{service_plan_id}/inbounds",
        "List inbound messages",
        "sinch",
        query="SinchInboundQuery",
        replies={200: "SinchInboundPage"},
        **S,
    ),
    Op(
        "get",
        "/xms/v1/{service_plan_id}/inbounds/{inbound_id}",
        "Get an inbound message",
        "sinch",
        replies={200: "SinchInbound"},
        **S,
    ),
)


def _operation(
    op: Op, path_params: list[str], schemas: dict[str, Schema | type[Schema]]
) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"in": "path", "name": name, "required": True, "schema": {"type": "string"}}
        for name in path_params
    ]
    if op.query:
        # apispec expands a schema given as query parameters into one parameter per field.
        params.append({"in": "query", "schema": schemas[op.query]})
    out: dict[str, Any] = {"summary": op.summary, "tags": [op.tag], "parameters": params}
    if op.body:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schemas[op.body]}},
        }
    responses: dict[str, Any] = {}
    for status, schema in op.replies.items():
        reply: dict[str, Any] = {"description": "OK"}
        if schema:
            reply["content"] = {"application/json": {"schema": schemas[schema]}}
        responses[str(status)] = reply
    error = {"application/json": {"schema": schemas[op.error]}}
    for status in (400, 401, 404):
        responses[str(status)] = {"description": "Error", "content": error}
    if op.tag == "sinch":
        responses["403"] = {"description": "Token not valid for the service plan", "content": error}
    out["responses"] = responses
    out["security"] = [] if op.tag == "ops" else [{"bearer": []}]
    return out


def build(settings: Settings) -> dict[str, Any]:
    """The OpenAPI 3 document as a dict."""
    spec = APISpec(
        title="Dispatcher",
        version="1",
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={"description": "Messaging Plus, Sinch (XMS batches) and 8x8 compatible APIs."},
    )
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    schemas = _schemas(settings)
    for name, schema in schemas.items():
        spec.components.schema(name, schema=schema)
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        names = [part[1:-1] for part in op.path.split("/") if part.startswith("{")]
        paths.setdefault(op.path, {})[op.method] = _operation(op, names, schemas)
    for path, operations in paths.items():
        spec.path(path=path, operations=operations)
    return spec.to_dict()


def register(app: Flask) -> None:
    """Serve the document at /openapi.json (built once per app)."""

    @app.get("/openapi.json")
    def openapi() -> dict[str, Any]:
        document = current_app.extensions.get("openapi")
        if document is None:
            settings = current_app.extensions["dispatcher"].settings
            document = current_app.extensions["openapi"] = build(settings)
        return document
