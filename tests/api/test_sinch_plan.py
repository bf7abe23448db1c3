"""Service plan settings set with the CLI, and what Sinch clients send beyond the SDK."""

from __future__ import annotations

from click.testing import CliRunner
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.accounts.models import Account
from dispatcher.cli import main
from dispatcher.config import Settings
from tests.factories import Tenant
from tests.helpers.sinch import A, B, assert_error, created, url


def plan(settings: Settings, *args: str, ok: bool = True) -> str:
    env = settings.to_env()
    result = CliRunner().invoke(main, ["accounts", "plan", *args], env=env)
    assert (result.exit_code == 0) == ok, (result.output, result.exception)
    return result.output


def test_cli_sets_and_clears_the_plan_defaults(
    client: FlaskClient, tenant: Tenant, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    out = plan(
        settings,
        tenant.id,
        "--default-originator",
        "AcmeCo",
        "--default-callback-url",
        "http://127.0.0.1:9/plan",
        "--callback-signing",
        "sinch",
    )
    assert "AcmeCo" in out and "http://127.0.0.1:9/plan" in out and "sinch" in out
    batch = client.post(url(tenant), json={"to": [A], "body": "Hi"}, headers=tenant.auth)
    assert batch.status_code == 201, batch.get_json()
    assert batch.get_json()["from"] == "AcmeCo"
    assert batch.get_json()["callback_url"] == "http://127.0.0.1:9/plan"
    # A batch's own values win over the plan's.
    own = created(client, tenant, callback_url="http://127.0.0.1:9/own")
    assert (own["from"], own["callback_url"]) == ("12345", "http://127.0.0.1:9/own")
    # Cleared by an update (older SDKs send null), it falls back to the plan's again.
    cleared = client.post(
        url(tenant, f"/{own['id']}"), json={"callback_url": None}, headers=tenant.auth
    )
    assert cleared.get_json()["callback_url"] == "http://127.0.0.1:9/plan"

    plan(settings, tenant.id, "--no-default-originator", "--callback-signing", "standard")
    with sessions() as session:
        account = session.get(Account, tenant.id)
        assert account is not None
        assert account.default_originator is None and account.callback_signing == "standard"
        assert account.default_callback_url == "http://127.0.0.1:9/plan"
    missing = client.post(url(tenant), json={"to": [A], "body": "Hi"}, headers=tenant.auth)
    assert "default originator" in assert_error(missing, 400, "syntax_constraint_violation")


def test_cli_refuses_private_callback_urls_and_unknown_accounts(
    tenant: Tenant, settings: Settings
) -> None:
    refused = plan(settings, tenant.id, "--default-callback-url", "http://10.0.0.1/hook", ok=False)
    assert "refused" in refused
    assert "not found" in plan(settings, "no-such-account", "--no-default-originator", ok=False)
    assert "is not one of" in plan(settings, tenant.id, "--callback-signing", "md5", ok=False)


def test_update_takes_the_sdk_type_and_older_sdks_nulls(
    client: FlaskClient, tenant: Tenant
) -> None:
    batch = created(
        client,
        tenant,
        to=[A],
        callback_url="http://127.0.0.1:9/cb",
        client_reference="ref",
        delivery_report="full",
    )
    # What the older clx SDK sends: every field, unset ones as null.
    body = {
        "type": "mt_text",
        "from": None,
        "body": "Changed",
        "to_add": [B[1:]],
        "to_remove": None,
        "delivery_report": None,
        "send_at": None,
        "expire_at": None,
        "callback_url": None,
        "client_reference": None,
        "parameters": None,
    }
    response = client.post(url(tenant, f"/{batch['id']}"), json=body, headers=tenant.auth)
    assert response.status_code == 200, response.get_json()
    data = response.get_json()
    assert (data["from"], data["body"], sorted(data["to"])) == ("12345", "Changed", [A, B])
    assert data["delivery_report"] == "none"
    assert "callback_url" not in data and "client_reference" not in data
    binary = client.post(
        url(tenant, f"/{batch['id']}"), json={"type": "mt_binary"}, headers=tenant.auth
    )
    assert_error(binary, 400, "syntax_constraint_violation")


def test_group_ids_are_refused_when_unknown(client: FlaskClient, tenant: Tenant) -> None:
    response = client.post(
        url(tenant),
        json={"from": "1", "to": ["01ARZ3NDEKTSV4RRFFQ69G5FAV"], "body": "x"},
        headers=tenant.auth,
    )
    assert "group" in assert_error(response, 404, "not_found")
    bad = client.post(
        url(tenant), json={"from": "1", "to": ["ABC"], "body": "x"}, headers=tenant.auth
    )
    assert_error(bad, 400, "syntax_invalid_parameter_format")


def test_groups_expand_within_the_recipient_limit(
    client: FlaskClient, tenant: Tenant, settings: Settings
) -> None:
    members = [f"+4477009{n:05d}" for n in range(settings.max_destinations)]
    made = client.post(
        f"/xms/v1/{tenant.id}/groups", json={"members": members}, headers=tenant.auth
    )
    assert made.status_code == 201 and made.get_json()["size"] == len(members)
    group_id = made.get_json()["id"]
    ok = client.post(
        url(tenant), json={"from": "1", "to": [group_id], "body": "x"}, headers=tenant.auth
    )
    assert ok.status_code == 201 and len(ok.get_json()["to"]) == len(members)
    over = client.post(
        url(tenant),
        json={"from": "1", "to": [group_id, "+447700800001"], "body": "x"},
        headers=tenant.auth,
    )
    assert "at most" in assert_error(over, 400, "syntax_constraint_violation")


def test_groups_stop_expanding_once_over_the_recipient_limit(
    client: FlaskClient, tenant: Tenant, settings: Settings
) -> None:
    """Groups hold up to 10,000 members each: naming many must not load them all to
    find the batch too large. The first one over the limit ends the expansion, so the
    unknown group named after it is never looked up (a 400, not its 404)."""
    members = [f"+4477008{n:05d}" for n in range(settings.max_destinations + 1)]
    made = client.post(
        f"/xms/v1/{tenant.id}/groups", json={"members": members}, headers=tenant.auth
    )
    assert made.status_code == 201
    body = {"from": "1", "to": [made.get_json()["id"], "01ARZ3NDEKTSV4RRFFQ69G5FAV"], "body": "x"}
    over = client.post(url(tenant), json=body, headers=tenant.auth)
    assert "at most" in assert_error(over, 400, "syntax_constraint_violation")
