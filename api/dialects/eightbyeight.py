"""8x8 Chat Apps compatible cancel (8x8 Chat Apps API: "Cancel batch of scheduled message")."""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Response

from api import context as ctx
from api.errors import error_response, register_on
from api.fields import batch_ref
from dispatcher.batches import service
from dispatcher.errors import Conflict, Unauthenticated

blueprint = Blueprint("eightbyeight", __name__, url_prefix="/api/v1/subaccounts")
register_on(blueprint)

SUBACCOUNT = re.compile(r"^[A-Za-z0-9\-._&]{3,50}$")


@blueprint.errorhandler(Unauthenticated)
def _unauthenticated(_exc: Unauthenticated) -> Response:
    return error_response(401, "Request was not authenticated properly", code=1200)


@blueprint.delete("/<sub_account_id>/messages/batch/<batch_id>")
def cancel_batch(sub_account_id: str, batch_id: str) -> Any:
    account = ctx.account()
    if not SUBACCOUNT.match(sub_account_id) or sub_account_id != account.id:
        return error_response(
            400, "Provided subAccountId doesn't belongs to your account", code=1001
        )
    try:
        _batch, count = service.cancel_batch(
            session=ctx.session(),
            account=account,
            batch_id=batch_ref(batch_id),
            chunk_size=ctx.settings().chunk_size,
        )
    except Conflict:
        # Nothing left to cancel: 8x8 reports it as a count of zero.
        count = 0
    return {"cancelledCount": count}
