"""/openapi.json: generated from the marshmallow schemas, covering every route of the app."""

from __future__ import annotations

import re

from flask.testing import FlaskClient

from api.app import create_app
from dispatcher.runtime import Runtime
from tests.factories import Tenant


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
    # from may be left out: the service plan's default originator is used.
    assert set(send["required"]) == {"to", "body"}
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


def test_every_operation_documents_its_replies_and_errors(client: FlaskClient) -> None:
    doc = client.get("/openapi.json").get_json()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            assert {"405", "414", "431"} <= codes, (method, path)
            assert "Allow" in op["responses"]["405"]["headers"]
            ok = [c for c in codes if c.startswith("2")]
            assert ok, (method, path)
            if path != "/xms/v1/{service_plan_id}/batches/{batch_id}/delivery_feedback":
                # 204 No Content has no body by definition.
                assert all("content" in op["responses"][c] for c in ok if c != "204"), (
                    method,
                    path,
                )
            if op["security"] and path not in ("/metrics", "/dlr/{provider}"):
                assert {"400", "401", "404"} <= codes, (method, path)
    cancel = doc["paths"]["/api/v1/subaccounts/{sub_account_id}/messages/batch/{batch_id}"]
    assert "doesn't belong" in cancel["delete"]["responses"]["400"]["description"]
    get_batch = doc["paths"]["/batch/{batch_id}"]["get"]
    assert [p["name"] for p in get_batch["parameters"]] == ["batch_id"]
    message = {p["name"] for p in doc["paths"]["/message"]["post"]["parameters"]}
    assert message == {"dryRun"}
    links = doc["paths"]["/batch"]["post"]["responses"]["200"]["links"]
    assert links["GetBatch"]["parameters"] == {"batch_id": "$response.body#/identifier"}
    sinch = doc["paths"]["/xms/v1/{service_plan_id}/batches"]["post"]["responses"]["201"]
    assert sinch["links"]["GetBatch"]["operationId"] == "sinchGetBatch"


def test_limits_in_force_are_documented_and_enforced_by_every_dialect(
    runtime: Runtime, tenant: Tenant
) -> None:
    settings = runtime.settings.replace(max_destinations=2, max_body_length=10)
    small = Runtime(settings, runtime.publisher)
    try:
        client = create_app(settings, runtime=small).test_client()
        schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
        assert schemas["SinchSend"]["properties"]["to"]["maxItems"] == 2
        assert schemas["SinchSend"]["properties"]["body"]["maxLength"] == 10
        assert schemas["MplusBatch"]["properties"]["destinations"]["maxItems"] == 2
        assert schemas["MplusBatch"]["properties"]["message"]["maxLength"] == 10
        three = ["+447700900001", "+447700900002", "+447700900003"]
        sinch = client.post(
            f"/xms/v1/{tenant.id}/batches",
            json={"from": "Shop", "to": three, "body": "hi"},
            headers=tenant.auth,
        )
        assert sinch.status_code == 400 and "to" in sinch.get_json()["text"]
        long = client.post(
            f"/xms/v1/{tenant.id}/batches",
            json={"from": "Shop", "to": three[:1], "body": "x" * 11},
            headers=tenant.auth,
        )
        assert long.status_code == 400 and "body" in long.get_json()["text"]
    finally:
        small.dispose()


def test_docs_page_and_its_assets_are_served_from_the_package(client: FlaskClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "/openapi.json" in client.get("/docs/dispatcher-init.js").get_data(as_text=True)
    for asset in ("swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js"):
        assert f"/docs/{asset}" in html
        reply = client.get(f"/docs/{asset}")
        assert reply.status_code == 200 and len(reply.get_data()) > 1000, asset
    assert "http" not in html.replace("http-equiv", "")  # nothing from another host
    assert client.get("/docs/index.j2").status_code == 404
