"""The Sinch blueprint: every route is under ``/xms/v1/{service_plan_id}``.

The service plan id is the account's id; a token used with another plan id is
refused before any view. Batches, delivery reports and groups add their routes
to this one blueprint, so they share its error shape and its plan check.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g

from api import context as ctx
from api.dialects.sinch.errors import INVALID_JSON, SinchError, register_on
from dispatcher import errors

blueprint = Blueprint("sinch", __name__, url_prefix="/xms/v1/<service_plan_id>")
register_on(blueprint)


@blueprint.url_value_preprocessor
def _plan(_endpoint: str | None, values: dict[str, Any] | None) -> None:
    g.service_plan_id = (values or {}).pop("service_plan_id", None)


@blueprint.before_request
def _authorise() -> None:
    account = ctx.account()
    if g.service_plan_id != account.id:
        raise SinchError(
            403, "forbidden", f"the API token is not valid for service plan {g.service_plan_id}"
        )


def json_body() -> Any:
    """The parsed body (any Content-Type, as Sinch takes it); broken JSON is syntax_invalid_json."""
    try:
        return ctx.json_body()
    except errors.ValidationError as exc:
        raise SinchError(400, INVALID_JSON, exc.message) from exc
