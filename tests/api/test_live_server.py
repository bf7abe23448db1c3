"""Replies only a real server shows: body limits, request-head limits and 405s through gunicorn."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import requests

from dispatcher.config import Settings
from tests.api.live import Live, gunicorn
from tests.factories import Tenant

BIG = 12 * 1024 * 1024


@pytest.fixture(scope="module")
def live(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One gunicorn per database for the module: each test sends its own requests and
    changes nothing in the server (a boot costs 2-4 s, most of a test here)."""
    with gunicorn(settings, tmp_path_factory.mktemp("gunicorn")) as server:
        yield server


def test_a_12_mb_body_gets_the_413_even_from_a_client_that_writes_it_all_first(
    live: Live, tenant: Tenant
) -> None:
    # urllib sends the whole body before it reads a byte of the reply.
    request = urllib.request.Request(
        f"{live.url}/batch",
        data=b"{" + b" " * BIG + b"}",
        headers={**tenant.auth, "Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 413
    body = json.loads(caught.value.read())
    caught.value.close()
    assert body["code"] == 1413 and "too large" in body["message"]


def test_a_12_mb_body_gets_the_413_from_requests(live: Live, tenant: Tenant) -> None:
    response = requests.post(
        f"{live.url}/xms/v1/{tenant.id}/batches",
        data=b"{" + b" " * BIG + b"}",
        headers=tenant.auth,
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json() == {"code": "request_too_large", "text": "request body too large"}


def test_a_long_request_target_is_answered_in_the_dialects_shape(
    live: Live, tenant: Tenant
) -> None:
    long = "a" * 8100  # over the app's 8000 bytes, under gunicorn's 8190
    native = requests.get(f"{live.url}/batch/x?pad={long}", headers=tenant.auth, timeout=10)
    assert native.status_code == 414
    assert native.json()["code"] == 1414
    sinch = requests.get(
        f"{live.url}/xms/v1/{tenant.id}/batches?client_reference={long}",
        headers=tenant.auth,
        timeout=10,
    )
    assert sinch.status_code == 414
    assert sinch.json()["code"] == "uri_too_long"


def test_a_request_line_over_gunicorns_limit_is_json_not_html(live: Live, tenant: Tenant) -> None:
    long = "a" * 9000  # over gunicorn's 8190: refused before the app sees it
    response = requests.get(f"{live.url}/batch/x?pad={long}", headers=tenant.auth, timeout=10)
    assert response.status_code == 414
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["code"] == 1414


def test_too_many_header_fields_is_a_431_in_the_dialects_shape(live: Live, tenant: Tenant) -> None:
    headers = {**tenant.auth, **{f"X-Pad-{i}": "x" for i in range(150)}}
    response = requests.get(f"{live.url}/batch/x", headers=headers, timeout=10)
    assert response.status_code == 431
    assert response.json()["code"] == 1431


@pytest.mark.parametrize(
    ("path", "allowed"),
    [("/health", "GET, HEAD, OPTIONS"), ("/xms/v1/x/batches/y", None)],
)
def test_405_names_the_allowed_methods(live: Live, path: str, allowed: str | None) -> None:
    response = requests.request("TRACE", f"{live.url}{path}", timeout=10)
    assert response.status_code == 405
    assert response.headers["Allow"]
    if allowed:
        assert response.headers["Allow"] == allowed
        assert response.json()["code"] == 1405
    else:
        assert {"GET", "POST", "PUT", "DELETE"} <= set(response.headers["Allow"].split(", "))
        assert response.json()["code"] == "method_not_allowed"
