"""Sinch groups views (Sinch SMS REST API reference, "Groups"): parse, call one service, dump.

Groups belong to the account; another account's group id answers 404, as a batch does.
"""

from __future__ import annotations

from typing import Any

from flask import Response, request

from api import context as ctx
from api.dialects.sinch import group_schemas as schemas
from api.dialects.sinch.plan import blueprint, json_body
from api.dialects.sinch.schemas import page_of
from dispatcher.groups import service
from dispatcher.groups.models import Group


def _owner() -> dict[str, Any]:
    """Whose groups: every group service call is scoped to the calling account."""
    return {"session": ctx.session(), "account_id": ctx.account().id}


def _fields(group: Group, size: int) -> dict[str, Any]:
    return {
        "id": group.id,
        "name": group.name,
        "size": size,
        "created_at": group.created_at,
        "modified_at": group.modified_at,
        "child_groups": [],
    }


def _reply(group: Group) -> dict[str, Any]:
    size = service.sizes_of(session=ctx.session(), group_ids=[group.id])[group.id]
    return schemas.GroupReply().dump(_fields(group, size))


@blueprint.post("/groups")
def create_group() -> tuple[dict[str, Any], int]:
    data = schemas.GroupSchema().load(json_body())
    group = service.create_group(
        **_owner(),
        name=data["name"],
        members=data["members"] or [],
    )
    return _reply(group), 201


@blueprint.get("/groups")
def list_groups() -> dict[str, Any]:
    query = schemas.GroupListQuery().load(request.args)
    rows, total = service.list_groups(
        **_owner(),
        page=query["page"],
        page_size=query["page_size"],
    )
    sizes = service.sizes_of(session=ctx.session(), group_ids=[g.id for g in rows])
    return schemas.GroupPage().dump(
        page_of(query, total, "groups", [_fields(g, sizes[g.id]) for g in rows])
    )


@blueprint.get("/groups/<group_id>")
def get_group(group_id: str) -> dict[str, Any]:
    return _reply(service.get_group(**_owner(), group_id=group_id))


@blueprint.put("/groups/<group_id>")
def replace_group(group_id: str) -> dict[str, Any]:
    data = schemas.GroupSchema().load(json_body())
    group = service.replace_group(
        **_owner(),
        group_id=group_id,
        name=data["name"],
        members=data["members"] or [],
    )
    return _reply(group)


@blueprint.post("/groups/<group_id>")
def update_group(group_id: str) -> dict[str, Any]:
    data = schemas.GroupUpdateSchema().load(json_body())
    group = service.update_group(
        **_owner(),
        group_id=group_id,
        fields={"name": data["name"]} if "name" in data else {},
        add=data["add"] or (),
        remove=data["remove"] or (),
        add_from_group=data["add_from_group"],
        remove_from_group=data["remove_from_group"],
    )
    return _reply(group)


@blueprint.delete("/groups/<group_id>")
def delete_group(group_id: str) -> Response:
    service.delete_group(**_owner(), group_id=group_id)
    return Response(status=204)


@blueprint.get("/groups/<group_id>/members")
def list_members(group_id: str) -> list[str]:
    group = service.get_group(**_owner(), group_id=group_id)
    return service.members_of(session=ctx.session(), group_id=group.id)
