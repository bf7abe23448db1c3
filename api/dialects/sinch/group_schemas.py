"""Marshmallow schemas of the Sinch SMS REST API "Groups": requests and replies.

Members are numbers (accepted with or without +, returned with +). Child groups
and keyword auto-update (both driven by inbound messages in Sinch) are refused
with a clear error rather than stored and ignored.
"""

from __future__ import annotations

from typing import Any

from marshmallow import ValidationError, fields, validate, validates_schema

from api.dialects.sinch.schemas import Paged, Reply, SinchPage, SinchTime, Strict
from api.fields import Phone, Text
from dispatcher.groups.service import MAX_MEMBERS

_NAME = validate.Length(max=200)
_MEMBERS = validate.Length(max=MAX_MEMBERS)


def _unsupported(data: dict[str, Any]) -> None:
    if data.get("child_groups"):
        raise ValidationError("child groups are not supported by Dispatcher", "child_groups")
    if data.get("auto_update") is not None:
        raise ValidationError("keyword auto-update is not supported by Dispatcher", "auto_update")


class GroupSchema(Strict):
    """Body of create (POST .../groups) and replace (PUT .../groups/{id})."""

    name = Text(load_default=None, allow_none=True, validate=_NAME)
    members = fields.List(Phone(), load_default=list, allow_none=True, validate=_MEMBERS)
    child_groups = fields.List(Text(), load_default=None, allow_none=True)
    auto_update = fields.Dict(load_default=None, allow_none=True)

    @validates_schema
    def _rules(self, data: dict[str, Any], **_: Any) -> None:
        _unsupported(data)


class GroupUpdateSchema(Strict):
    """Body of update (POST .../groups/{id}). The SDK sends every field, unset ones as
    null; a null ``name`` removes the name (Sinch's rule), other nulls change nothing."""

    name = Text(allow_none=True, validate=_NAME)
    add = fields.List(Phone(), load_default=None, allow_none=True, validate=_MEMBERS)
    remove = fields.List(Phone(), load_default=None, allow_none=True, validate=_MEMBERS)
    add_from_group = Text(load_default=None, allow_none=True)
    remove_from_group = Text(load_default=None, allow_none=True)
    auto_update = fields.Dict(load_default=None, allow_none=True)

    @validates_schema
    def _rules(self, data: dict[str, Any], **_: Any) -> None:
        _unsupported(data)


class GroupListQuery(Paged):
    """GET .../groups."""


class GroupReply(Reply):
    OPTIONAL = ("name",)

    id = fields.String(required=True)
    name = fields.String()
    size = fields.Integer(required=True)
    created_at = SinchTime(required=True)
    modified_at = SinchTime(required=True)
    child_groups = fields.List(fields.String(), required=True)


class GroupPage(SinchPage):
    groups = fields.List(fields.Nested(GroupReply), required=True)
