"""/openapi.json: generated from the marshmallow schemas, covering every route of the app."""

from __future__ import annotations

import re

from flask.testing import FlaskClient


def test_openapi_covers_every_route(client: FlaskClient) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    doc = response.get_json()
    assert doc["openapi"].startswith("3.")
    routes = {
        (method.lower(), re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule))
        for rule in client.application.url_map.iter_rules()
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}
        # The document itself and its browsable page are not API operations.
        if rule.endpoint not in ("static", "ops.openapi_document", "ops.docs", "ops.docs_asset")
    }
    documented = {(m, path) for path, ops in doc["paths"].items() for m in ops}
    assert routes == documented


def test_sinch_schemas_come_from_marshmallow(client: FlaskClient) -> None:
    doc = client.get("/openapi.json").get_json()
    schemas = doc["components"]["schemas"]
    batch = schemas["SinchBatch"]["properties"]
    assert {"id", "to", "from", "canceled", "created_at", "modified_at", "send_at"} <= set(batch)
    assert batch["canceled"]["type"] == "boolean"
    assert batch["created_at"]["format"] == "date-time"
    send = schemas["SinchSend"]
    assert set(send["required"]) == {"to", "from", "body"}
    assert send["properties"]["delivery_report"]["enum"] == [
        "none",
        "summary",
        "full",
        "per_recipient",
        "per_recipient_final",
    ]
    assert send["properties"]["to"]["maxItems"] == 1000
    assert schemas["SinchError"]["required"] == ["code", "text"]
    xms = doc["paths"]["/xms/v1/{service_plan_id}/batches"]
    assert "201" in xms["post"]["responses"]
    assert xms["post"]["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SinchBatch"
    }
    names = {p["name"] for p in xms["get"]["parameters"]}
    assert {"page", "page_size", "from", "start_date", "end_date", "client_reference"} <= names
    assert "MplusBatch" in schemas and "CancelledCount" in schemas
    # Public: no key needed to read the document.
    assert client.get("/openapi.json").status_code == 200
