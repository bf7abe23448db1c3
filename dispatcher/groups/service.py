"""Creating, changing and reading groups; expanding group ids in a batch's recipients."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterable, Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from dispatcher.db import utcnow
from dispatcher.errors import NotFound, ValidationError
from dispatcher.groups.models import Group, GroupMember

# Crockford base32, as Sinch writes its ULID group ids ("01FC66621VHDBN119Z8PMV1AHY").
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
GROUP_ID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
MAX_MEMBERS = 10_000


def new_group_id() -> str:
    """A ULID: 48 bits of milliseconds then 80 random bits, so ids sort by creation."""
    value = (int(time.time() * 1000) << 80) | secrets.randbits(80)
    return "".join(_ALPHABET[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def is_group_id(text: str) -> bool:
    """Whether a recipient entry names a group rather than a number."""
    return bool(GROUP_ID.match(text))


def get_group(*, session: Session, account_id: str, group_id: str) -> Group:
    """The account's group, or NotFound (another account's group is not found either)."""
    # Checked before any query: a malformed id (a NUL byte, say) is simply not found.
    group = session.get(Group, group_id) if is_group_id(group_id) else None
    if group is None or group.account_id != account_id:
        raise NotFound(f"group {group_id} not found")
    return group


def members_of(*, session: Session, group_id: str) -> list[str]:
    """The group's numbers, sorted."""
    return list(
        session.scalars(
            select(GroupMember.msisdn)
            .where(GroupMember.group_id == group_id)
            .order_by(GroupMember.msisdn)
        )
    )


def sizes_of(*, session: Session, group_ids: Sequence[str]) -> dict[str, int]:
    """Member counts per group."""
    rows = session.execute(
        select(GroupMember.group_id, func.count())
        .where(GroupMember.group_id.in_(group_ids))
        .group_by(GroupMember.group_id)
    )
    counts = {gid: 0 for gid in group_ids}
    counts.update({gid: n for gid, n in rows})
    return counts


def _add(session: Session, group: Group, numbers: Iterable[str]) -> None:
    have = set(members_of(session=session, group_id=group.id))
    new = [n for n in dict.fromkeys(numbers) if n not in have]
    if len(have) + len(new) > MAX_MEMBERS:
        raise ValidationError(f"a group holds at most {MAX_MEMBERS} members")
    session.add_all(GroupMember(group_id=group.id, msisdn=n) for n in new)


def _remove(session: Session, group: Group, numbers: Iterable[str]) -> None:
    session.execute(
        delete(GroupMember).where(
            GroupMember.group_id == group.id, GroupMember.msisdn.in_(list(numbers))
        )
    )


def create_group(
    *, session: Session, account_id: str, name: str | None, members: Sequence[str]
) -> Group:
    """A new group of the account with ``members``."""
    now = utcnow()
    group = Group(
        id=new_group_id(), account_id=account_id, name=name, created_at=now, modified_at=now
    )
    session.add(group)
    session.flush()
    _add(session, group, members)
    session.flush()
    return group


def list_groups(
    *, session: Session, account_id: str, page: int, page_size: int
) -> tuple[list[Group], int]:
    """One page of the account's groups, oldest first, and how many there are."""
    where = Group.account_id == account_id
    total = session.scalar(select(func.count()).select_from(Group).where(where)) or 0
    rows = session.scalars(
        select(Group)
        .where(where)
        .order_by(Group.created_at, Group.id)
        .offset(page * page_size)
        .limit(page_size)
    )
    return list(rows), total


def replace_group(
    *, session: Session, account_id: str, group_id: str, name: str | None, members: Sequence[str]
) -> Group:
    """Replace the group's name and members."""
    group = get_group(session=session, account_id=account_id, group_id=group_id)
    session.execute(delete(GroupMember).where(GroupMember.group_id == group.id))
    group.name = name
    group.modified_at = utcnow()
    _add(session, group, members)
    session.flush()
    return group


def update_group(
    *,
    session: Session,
    account_id: str,
    group_id: str,
    fields: dict[str, str | None],
    add: Sequence[str] = (),
    remove: Sequence[str] = (),
    add_from_group: str | None = None,
    remove_from_group: str | None = None,
) -> Group:
    """Add and remove members (removals after additions, as Sinch applies them)."""
    group = get_group(session=session, account_id=account_id, group_id=group_id)
    adding = list(add)
    removing = list(remove)
    if add_from_group is not None:
        get_group(session=session, account_id=account_id, group_id=add_from_group)
        adding += members_of(session=session, group_id=add_from_group)
    if remove_from_group is not None:
        get_group(session=session, account_id=account_id, group_id=remove_from_group)
        removing += members_of(session=session, group_id=remove_from_group)
    if "name" in fields:
        group.name = fields["name"]
    _add(session, group, adding)
    session.flush()
    if removing:
        _remove(session, group, removing)
    group.modified_at = utcnow()
    session.flush()
    return group


def delete_group(*, session: Session, account_id: str, group_id: str) -> None:
    """Delete the group and its members."""
    group = get_group(session=session, account_id=account_id, group_id=group_id)
    session.execute(delete(GroupMember).where(GroupMember.group_id == group.id))
    session.delete(group)
    session.flush()


def expand(
    *,
    session: Session,
    account_id: str,
    entries: Sequence[str],
    most: int | None = None,
    field: str = "to",
) -> list[str]:
    """Recipients with every group id replaced by its members, first occurrence kept;
    past ``most`` of them a ValidationError (on ``field``), before another group is read."""
    out: dict[str, None] = {}
    for entry in entries:
        if is_group_id(entry):
            group = get_group(session=session, account_id=account_id, group_id=entry)
            out.update(dict.fromkeys(members_of(session=session, group_id=group.id)))
        else:
            out[entry] = None
        if most is not None and len(out) > most:
            raise ValidationError(
                f"over {most} recipients with the groups; at most {most}", field=field
            )
    return list(out)
