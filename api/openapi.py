"""The OpenAPI document of the three dialects, built by apispec from the marshmallow schemas.

Only the operation table below is written by hand (method, path, which schema is
the body, the query, each reply, the links); every schema is the one the views load
or dump with, built with the settings in force so the limits match. Every operation
lists each status it can answer, errors in its dialect's shape.
tests/test_openapi.py checks the table covers every route of the app, and
tests/api/test_schemathesis.py checks the server against the document.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema, fields

from api import callbacks, ops, receipts
from api.dialects import eightbyeight
from api.dialects.mplus import replies as mplus_replies
from api.dialects.mplus import report
from api.dialects.mplus import schemas as mplus
from api.dialects.sinch import group_schemas as sinch_groups
from api.dialects.sinch import inbounds as sinch_inbounds
from api.dialects.sinch import schemas as sinch
from api.errors import CODES
from dispatcher.config import Settings


class NativeError(Schema):
    """The Messaging Plus / 8x8 error shape (api/errors.py)."""

    code = fields.Integer(required=True, metadata={"enum": sorted({*CODES.values(), 1001})})
    message = fields.String(required=True)
    errorId = fields.UUID(required=True)
    timestamp = fields.String(required=True, metadata={"format": "date-time"})


class DlrReply(Schema):
    """Receipts and status webhooks: how many were applied, kept until their send is
    recorded (pending), and ignored (unknown, stale or repeated)."""

    applied = fields.Integer(required=True)
    pending = fields.Integer(required=True)
    ignored = fields.Integer(required=True)


# ``?key=`` is documented as a security scheme, not as each operation's parameter.
NO_KEY = ("key",)


def _schemas(settings: Settings) -> dict[str, Schema | type[Schema]]:
    return {
        # Messaging Plus API
        "MplusBatch": mplus.BatchSchema(settings=settings),
        "MplusBatchQuery": mplus.BatchQuery(exclude=NO_KEY),
        "MplusMessageQuery": mplus.MessageQuery(exclude=NO_KEY),
        "MplusMessages": mplus.MessagesEnvelope(settings=settings),
        "MplusSender": mplus.SenderSchema,
        "MplusMessage": mplus.MessageSchema(settings=settings),
        "MplusPageQuery": mplus.PageQuery(exclude=NO_KEY),
        "MplusReportQuery": report.ReportQuery(exclude=NO_KEY),
        "MplusCreated": mplus_replies.Created,
        "MplusDryRun": mplus_replies.DryRun,
        "MplusRecipientError": mplus_replies.Error,
        "MplusBatchStatus": mplus_replies.Batch,
        "MplusRecipient": mplus_replies.Recipient,
        "MplusMessagesPage": mplus_replies.MessagesPage,
        "MplusCancelled": mplus_replies.Cancelled,
        "MplusMessageSender": mplus_replies.Sender,
        "MplusMessageReply": mplus_replies.Message,
        "MplusMessagesReply": mplus_replies.Messages,
        "MplusReportRow": mplus_replies.ReportRow,
        "MplusReport": mplus_replies.Report,
        "CallbackQuery": callbacks.ListQuery(exclude=NO_KEY),
        "Callback": callbacks.CallbackReply,
        "CallbackPage": callbacks.CallbackPage,
        "CallbackEndpoint": callbacks.EndpointReply,
        "CallbackEndpoints": callbacks.EndpointList,
        "EnableEndpoint": callbacks.EnableBody,
        "EndpointEnabled": callbacks.Enabled,
        "DlrError": receipts.ErrorSchema,
        "DlrReceipt": receipts.ReceiptSchema,
        "DlrReply": DlrReply,
        "Health": ops.HealthReply,
        # 8x8 Chat Apps API
        "CancelledCount": eightbyeight.CancelledCount,
        "NativeError": NativeError,
        # Sinch SMS REST API
        "SinchSend": sinch.SendSchema(settings=settings),
        "SinchUpdate": sinch.UpdateSchema(settings=settings),
        "SinchDryRunQuery": sinch.DryRunQuery,
        "SinchListQuery": sinch.ListQuery,
        "SinchReportQuery": sinch.ReportQuery,
        "SinchFeedback": sinch.FeedbackSchema(settings=settings),
        # Nested schemas before the ones that nest them, so each is added once.
        "SinchBatch": sinch.BatchReply,
        "SinchBatchPage": sinch.BatchPage,
        "SinchDryRunRecipient": sinch.DryRunRecipient,
        "SinchDryRun": sinch.DryRunReply,
        "SinchStatusCount": sinch.StatusCount,
        "SinchDeliveryReport": sinch.DeliveryReport,
        "SinchRecipientDeliveryReport": sinch.RecipientDeliveryReport,
        "SinchError": sinch.ErrorReply,
        "SinchReportListQuery": sinch.ReportListQuery,
        "SinchDeliveryReportPage": sinch.DeliveryReportPage,
        "SinchGroup": sinch_groups.GroupSchema,
        "SinchGroupUpdate": sinch_groups.GroupUpdateSchema,
        "SinchGroupListQuery": sinch_groups.GroupListQuery,
        "SinchGroupReply": sinch_groups.GroupReply,
        "SinchGroupPage": sinch_groups.GroupPage,
        "SinchInboundQuery": sinch_inbounds.InboundQuery,
        "SinchInbound": sinch_inbounds.Inbound,
        "SinchInboundPage": sinch_inbounds.InboundPage,
    }


# Path parameters: what the server takes (api/fields.py path_ref, the Sinch recipient).
ID = {"type": "string", "minLength": 1, "maxLength": 100, "pattern": r"^[\x21-\x7e]+$"}
PATH_PARAMS: dict[str, dict[str, Any]] = {
    "batch_id": ID,
    "callback_id": ID,
    "inbound_id": ID,
    "group_id": {"type": "string", "pattern": "^[0-9A-HJKMNP-TV-Z]{26}$"},
    "service_plan_id": {**ID, "description": "Your account id"},
    "sub_account_id": {**ID, "description": "Your account id"},
    "provider": {"type": "string", "enum": sorted(receipts.PROVIDERS)},
    "recipient": {"type": "string", "pattern": r"^\+?[0-9]{1,19}$"},
}


def _link(op_id: str, source: str, **params: str) -> dict[str, Any]:
    return {"operationId": op_id, "parameters": {"batch_id": source, **params}}


NATIVE_ID = "$response.body#/identifier"
SINCH_ID = "$response.body#/id"
PLAN = "$request.path.service_plan_id"
BATCH_LINKS = {
    "GetBatch": _link("mplusGetBatch", NATIVE_ID),
    "ListMessages": _link("mplusListMessages", NATIVE_ID),
    "Report": _link("mplusReport", NATIVE_ID),
    "CancelBatch": _link("mplusCancelBatch", NATIVE_ID),
    "CancelBatch8x8": _link("eightbyeightCancelBatch", NATIVE_ID),
}
SINCH_LINKS = {
    name: _link(op_id, SINCH_ID, service_plan_id=PLAN)
    for name, op_id in (
        ("GetBatch", "sinchGetBatch"),
        ("UpdateBatch", "sinchUpdateBatch"),
        ("ReplaceBatch", "sinchReplaceBatch"),
        ("CancelBatch", "sinchCancelBatch"),
        ("DeliveryFeedback", "sinchDeliveryFeedback"),
        ("DeliveryReport", "sinchDeliveryReport"),
    )
}


@dataclass(frozen=True)
class Op:
    method: str
    path: str
    op_id: str
    summary: str
    tag: str
    body: str | None = None
    query: str | None = None
    replies: dict[int, str | None] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    links: dict[str, Any] = field(default_factory=dict)
    security: tuple[str, ...] = ("bearer", "key")
    reply_type: str = "application/json"


XMS = "/xms/v1/{service_plan_id}/batches"
# Replies that are not an object, so have no marshmallow schema.
PLAIN_REPLIES: dict[str, dict[str, Any]] = {
    "SinchGroupMembers": {"type": "array", "items": {"type": "string", "example": "+46701234567"}},
}
XMS_PLAN = "/xms/v1/{service_plan_id}"
GROUPS = XMS_PLAN + "/groups"
SINCH: dict[str, Any] = {"tag": "sinch", "security": ("bearer",)}
OPS: dict[str, Any] = {"tag": "ops", "security": ()}
NOT_OURS = "Provided subAccountId doesn't belongs to your account"
OPERATIONS = (
    Op(
        "post",
        "/batch",
        "mplusCreateBatch",
        "Add a batch",
        "mplus",
        "MplusBatch",
        "MplusBatchQuery",
        {200: "MplusCreated|MplusDryRun"},
        links=BATCH_LINKS,
    ),
    Op(
        "post",
        "/message",
        "mplusCreateMessages",
        "Send messages",
        "mplus",
        "MplusMessages",
        "MplusMessageQuery",
        {200: "MplusMessagesReply"},
    ),
    Op(
        "get",
        "/batch/{batch_id}",
        "mplusGetBatch",
        "Get a batch",
        "mplus",
        replies={200: "MplusBatchStatus"},
    ),
    Op(
        "delete",
        "/batch/{batch_id}",
        "mplusCancelBatch",
        "Cancel a batch",
        "mplus",
        replies={200: "MplusCancelled"},
    ),
    Op(
        "get",
        "/batch/{batch_id}/messages",
        "mplusListMessages",
        "A batch's messages",
        "mplus",
        query="MplusPageQuery",
        replies={200: "MplusMessagesPage"},
    ),
    Op(
        "get",
        "/batch/{batch_id}/report",
        "mplusReport",
        "A batch's report",
        "mplus",
        query="MplusReportQuery",
        replies={200: "MplusReport"},
    ),
    Op(
        "delete",
        "/api/v1/subaccounts/{sub_account_id}/messages/batch/{batch_id}",
        "eightbyeightCancelBatch",
        "Cancel a scheduled batch",
        "8x8",
        replies={200: "CancelledCount"},
        errors={400: NOT_OURS},
    ),
    Op(
        "get",
        "/callbacks",
        "listCallbacks",
        "List callbacks",
        "callbacks",
        query="CallbackQuery",
        replies={200: "CallbackPage"},
    ),
    Op(
        "post",
        "/callbacks/{callback_id}/retry",
        "retryCallback",
        "Retry a callback",
        "callbacks",
        replies={200: "Callback"},
    ),
    Op(
        "get",
        "/callbacks/endpoints",
        "listEndpoints",
        "Callback endpoints",
        "callbacks",
        replies={200: "CallbackEndpoints"},
    ),
    Op(
        "post",
        "/callbacks/endpoints/enable",
        "enableEndpoint",
        "Re-enable a callback endpoint",
        "callbacks",
        "EnableEndpoint",
        replies={200: "EndpointEnabled"},
    ),
    Op(
        "post",
        "/dlr/{provider}",
        "receiveReceipts",
        "Inbound carrier receipts (Bearer: the provider's shared secret)",
        "dlr",
        "DlrReceipts",
        replies={200: "DlrReply"},
        security=("bearer",),
    ),
    Op("get", "/health", "health", "Database and Redis", replies={200: "Health"}, **OPS),
    Op("get", "/health/live", "live", "The process answers", replies={200: "Health"}, **OPS),
    Op(
        "get",
        "/health/ready",
        "ready",
        "Database, Redis and a worker on every queue",
        replies={200: "Health"},
        **OPS,
    ),
    Op(
        "post",
        "/providers/rbm/events",
        "rbmEvents",
        "Google RBM events (verified with X-Goog-Signature)",
        "providers",
        replies={200: "DlrReply"},
        security=(),
    ),
    Op(
        "get",
        "/providers/whatsapp/webhook",
        "whatsappVerify",
        "WhatsApp webhook verification (hub.mode, hub.verify_token, hub.challenge)",
        "providers",
        replies={200: None},
        reply_type="text/plain",
        security=(),
    ),
    Op(
        "post",
        "/providers/whatsapp/webhook",
        "whatsappStatuses",
        "WhatsApp statuses (verified with X-Hub-Signature-256)",
        "providers",
        replies={200: "DlrReply"},
        security=(),
    ),
    Op(
        "post",
        "/providers/twilio/status",
        "twilioStatus",
        "Twilio StatusCallback (verified with X-Twilio-Signature)",
        "providers",
        replies={200: "DlrReply"},
        security=(),
    ),
    Op(
        "get",
        "/metrics",
        "metrics",
        "Prometheus metrics (Bearer: DISPATCHER_METRICS_TOKEN; 404 when none is set)",
        replies={200: None},
        reply_type="text/plain",
        tag="ops",
        security=("bearer",),
    ),
    Op(
        "post",
        XMS,
        "sinchSend",
        "Send",
        body="SinchSend",
        replies={201: "SinchBatch"},
        links=SINCH_LINKS,
        **SINCH,
    ),
    Op(
        "get",
        XMS,
        "sinchListBatches",
        "List batches",
        query="SinchListQuery",
        replies={200: "SinchBatchPage"},
        **SINCH,
    ),
    Op(
        "post",
        XMS + "/dry_run",
        "sinchDryRun",
        "Dry run",
        body="SinchSend",
        query="SinchDryRunQuery",
        replies={200: "SinchDryRun"},
        **SINCH,
    ),
    Op(
        "get",
        XMS + "/{batch_id}",
        "sinchGetBatch",
        "Get a batch",
        replies={200: "SinchBatch"},
        **SINCH,
    ),
    Op(
        "post",
        XMS + "/{batch_id}",
        "sinchUpdateBatch",
        "Update a batch",
        body="SinchUpdate",
        replies={200: "SinchBatch"},
        **SINCH,
    ),
    Op(
        "put",
        XMS + "/{batch_id}",
        "sinchReplaceBatch",
        "Replace a batch",
        body="SinchSend",
        replies={200: "SinchBatch"},
        **SINCH,
    ),
    Op(
        "delete",
        XMS + "/{batch_id}",
        "sinchCancelBatch",
        "Cancel a batch",
        replies={200: "SinchBatch"},
        **SINCH,
    ),
    Op(
        "post",
        XMS + "/{batch_id}/delivery_feedback",
        "sinchDeliveryFeedback",
        "Delivery feedback",
        body="SinchFeedback",
        replies={202: None},
        **SINCH,
    ),
    Op(
        "get",
        XMS + "/{batch_id}/delivery_report",
        "sinchDeliveryReport",
        "Batch delivery report",
        query="SinchReportQuery",
        replies={200: "SinchDeliveryReport"},
        **SINCH,
    ),
    Op(
        "get",
        XMS + "/{batch_id}/delivery_report/{recipient}",
        "sinchRecipientDeliveryReport",
        "Recipient delivery report",
        replies={200: "SinchRecipientDeliveryReport"},
        **SINCH,
    ),
    Op(
        "get",
        XMS_PLAN + "/delivery_reports",
        "sinchListDeliveryReports",
        "List recipient delivery reports",
        query="SinchReportListQuery",
        replies={200: "SinchDeliveryReportPage"},
        **SINCH,
    ),
    Op(
        "post",
        GROUPS,
        "sinchCreateGroup",
        "Create a group",
        body="SinchGroup",
        replies={201: "SinchGroupReply"},
        **SINCH,
    ),
    Op(
        "get",
        GROUPS,
        "sinchListGroups",
        "List groups",
        query="SinchGroupListQuery",
        replies={200: "SinchGroupPage"},
        **SINCH,
    ),
    Op(
        "get",
        GROUPS + "/{group_id}",
        "sinchGetGroup",
        "Get a group",
        replies={200: "SinchGroupReply"},
        **SINCH,
    ),
    Op(
        "put",
        GROUPS + "/{group_id}",
        "sinchReplaceGroup",
        "Replace a group",
        body="SinchGroup",
        replies={200: "SinchGroupReply"},
        **SINCH,
    ),
    Op(
        "post",
        GROUPS + "/{group_id}",
        "sinchUpdateGroup",
        "Update a group",
        body="SinchGroupUpdate",
        replies={200: "SinchGroupReply"},
        **SINCH,
    ),
    Op(
        "delete",
        GROUPS + "/{group_id}",
        "sinchDeleteGroup",
        "Delete a group",
        replies={204: None},
        **SINCH,
    ),
    Op(
        "get",
        GROUPS + "/{group_id}/members",
        "sinchListGroupMembers",
        "List a group's members (a JSON array of numbers)",
        replies={200: "SinchGroupMembers"},
        **SINCH,
    ),
    Op(
        "get",
        "/xms/v1/{service_plan_id}/inbounds",
        "sinchListInbounds",
        "List inbound messages",
        query="SinchInboundQuery",
        replies={200: "SinchInboundPage"},
        **SINCH,
    ),
    Op(
        "get",
        "/xms/v1/{service_plan_id}/inbounds/{inbound_id}",
        "sinchGetInbound",
        "Get an inbound message",
        replies={200: "SinchInbound"},
        **SINCH,
    ),
)

ERRORS = {
    400: "Invalid request (the message names the field)",
    401: "Missing, unknown or revoked credentials",
    403: "The API token is not valid for this service plan",
    404: "No such object for this account, or no such route",
    405: "Method not allowed on this path (the Allow header lists those that are)",
    409: "A concurrent request stored the same object (retry), or the id came with another body",
    413: "Request body too large",
    414: "Request target too long",
    431: "Request header fields too large",
    503: "A part the request needs is unavailable (retry)",
}


def _statuses(op: Op, path_params: list[str]) -> list[int]:
    """Each error status ``op`` can answer."""
    out = [405, 414, 431]
    if op.op_id == "metrics":
        return [*out, 401, 404]
    if op.tag == "ops":
        return [*out, 503] if op.path.startswith("/health") and op.path != "/health/live" else out
    # 404 too where nothing is named in the path: an id in the body can name what is gone.
    out += [400, 401, 404, 503]
    if op.body:
        out.append(413)
    if op.method != "get":
        out.append(409)
    if op.tag == "sinch":
        out.append(403)
    return sorted(out)


def _operation(
    op: Op, path_params: list[str], schemas: dict[str, Schema | type[Schema]]
) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"in": "path", "name": name, "required": True, "schema": PATH_PARAMS[name]}
        for name in path_params
    ]
    if op.query:
        # apispec expands a schema given as query parameters into one parameter per field.
        params.append({"in": "query", "schema": schemas[op.query]})
    out: dict[str, Any] = {
        "operationId": op.op_id,
        "summary": op.summary,
        "tags": [op.tag],
        "parameters": params,
    }
    if op.body == "DlrReceipts":
        receipt = {"$ref": "#/components/schemas/DlrReceipt"}
        body_schema: Any = {
            "oneOf": [
                receipt,
                {"type": "array", "items": receipt, "minItems": 1, "maxItems": 1000},
            ]
        }
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": body_schema}},
        }
    elif op.body:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schemas[op.body]}},
        }
    responses: dict[str, Any] = {}
    for status, schema in op.replies.items():
        reply: dict[str, Any] = {"description": "OK"}
        if schema in PLAIN_REPLIES:
            reply["content"] = {op.reply_type: {"schema": PLAIN_REPLIES[schema]}}
        elif schema and "|" in schema:
            # One of several shapes (a batch, or a dry run's analysis with ?dryRun=true).
            refs = [{"$ref": f"#/components/schemas/{name}"} for name in schema.split("|")]
            reply["content"] = {op.reply_type: {"schema": {"oneOf": refs}}}
        elif schema:
            reply["content"] = {op.reply_type: {"schema": schemas[schema]}}
        elif op.reply_type != "application/json":
            reply["content"] = {op.reply_type: {"schema": {"type": "string"}}}
        if op.links and status < 300:
            reply["links"] = op.links
        responses[str(status)] = reply
    shape = "SinchError" if op.tag == "sinch" else "NativeError"
    for status in _statuses(op, path_params):
        error: dict[str, Any] = {
            "description": op.errors.get(status) or ERRORS[status],
            "content": {"application/json": {"schema": schemas[shape]}},
        }
        if status == 503 and op.tag == "ops":
            error["content"] = {"application/json": {"schema": schemas["Health"]}}
        if status == 405:
            error["headers"] = {
                "Allow": {
                    "description": "The methods the path supports",
                    "schema": {"type": "string"},
                }
            }
        responses[str(status)] = error
    out["responses"] = responses
    out["security"] = [{name: []} for name in op.security]
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
    spec.components.security_scheme("key", {"type": "apiKey", "in": "query", "name": "key"})
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
