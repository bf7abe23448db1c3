"""SMS encoding detection and part counting (GSM 03.38 default alphabet / UCS-2).

A body is GSM-7 when every character is in the GSM 03.38 basic table or its
extension table; extension characters cost two septets (escape + character).
Anything else makes the whole body UCS-2, whose length is counted in UTF-16
code units (characters outside the BMP, e.g. most emoji, cost two units).

Limits: a single part holds 160 septets (GSM-7) or 70 units (UCS-2); once a body
is longer, every concatenated part holds 153 septets or 67 units (the rest is
the UDH). Parts are filled greedily, and an extension character (escape and
character) or a surrogate pair is never split across two parts, so a body can
need more parts than ``ceil(length / per_part)``.

An empty body is 0 characters and 1 part: carriers still send one empty SMS.
Strings that hold a surrogate pair as two separate code points are first joined
into the single character the pair encodes (the UTF-16 bytes are identical).
"""

from __future__ import annotations

import base64
import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from enum import StrEnum
from itertools import pairwise

__all__ = [
    "GSM_BASIC",
    "GSM_EXTENSION",
    "Encoding",
    "PartInfo",
    "analyse",
    "binary_parts",
    "split",
    "truncate",
]

GSM_BASIC: frozenset[str] = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅå"  # 0x00-0x0F
    "Δ_ΦΓΛΩΠΨΣΘΞÆæßÉ"  # 0x10-0x1F (0x1B is the escape, not a character)
    " !\"#¤%&'()*+,-./"  # 0x20-0x2F
    "0123456789:;<=>?"  # 0x30-0x3F
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"  # 0x40-0x5F
    "¿abcdefghijklmnopqrstuvwxyzäöñüà"  # 0x60-0x7F
)
"""The GSM 03.38 basic table: one septet per character."""

GSM_EXTENSION: frozenset[str] = frozenset("\f^{}\\[~]|€")
"""The GSM 03.38 extension table: two septets per character (escape + char)."""

_GSM_ALL: frozenset[str] = GSM_BASIC | GSM_EXTENSION

_GSM_SINGLE = 160
_GSM_CONCAT = 153
_UCS2_SINGLE = 70
_UCS2_CONCAT = 67


def _char_class(chars: frozenset[str], *, negate: bool = False) -> re.Pattern[str]:
    """Compile a regex character class matching (or excluding) ``chars``."""
    body = "".join(re.escape(c) for c in sorted(chars))
    return re.compile(f"[{'^' if negate else ''}{body}]")


_EXT_RE = _char_class(GSM_EXTENSION)
_NON_GSM_RE = _char_class(_GSM_ALL, negate=True)
_ASTRAL_RE = re.compile("[\U00010000-\U0010ffff]")
_SURROGATE_PAIR_RE = re.compile("[\ud800-\udbff][\udc00-\udfff]")


class Encoding(StrEnum):
    """SMS data coding, valued as Sinch dry_run reports it."""

    GSM7 = "GSM"
    UCS2 = "UNICODE"


@dataclass(frozen=True, slots=True)
class PartInfo:
    """Encoding, part count, length (septets or UTF-16 units) and per-part capacity."""

    encoding: Encoding
    parts: int
    length: int
    per_part: int


def _join_pair(match: re.Match[str]) -> str:
    """Turn a two-code-point surrogate pair into the character it encodes."""
    return match.group().encode("utf-16-le", "surrogatepass").decode("utf-16-le")


def _scan(body: str) -> tuple[str, Encoding, list[int]]:
    """Return the (pair-joined) body, its encoding and the indexes of 2-cost chars."""
    if _GSM_ALL.issuperset(body):
        return body, Encoding.GSM7, [m.start() for m in _EXT_RE.finditer(body)]
    if not body.isascii():
        body = _SURROGATE_PAIR_RE.sub(_join_pair, body)
        return body, Encoding.UCS2, [m.start() for m in _ASTRAL_RE.finditer(body)]
    return body, Encoding.UCS2, []


def _limits(encoding: Encoding) -> tuple[int, int]:
    """Return the (single-part, concatenated-part) capacity for ``encoding``."""
    if encoding is Encoding.GSM7:
        return _GSM_SINGLE, _GSM_CONCAT
    return _UCS2_SINGLE, _UCS2_CONCAT


def _part_ends(n: int, heavy: list[int], *, capacity: int, limit: int | None = None) -> list[int]:
    """Greedily cut ``n`` chars (``heavy`` ones cost 2) into parts; return end indexes."""
    if not heavy:
        stop = n if limit is None else min(n, capacity * limit)
        ends = list(range(capacity, stop, capacity))
        if not ends or ends[-1] != stop:
            ends.append(stop)
        return ends

    def cost(k: int) -> int:
        """Cost of the first ``k`` chars: one each, plus one per heavy char before ``k``."""
        return k + bisect_left(heavy, k)

    ends = []
    start = 0
    start_cost = 0
    while start < n and (limit is None or len(ends) < limit):
        target = start_cost + capacity
        hi = min(n + 1, start + capacity + 1)
        end = bisect_right(range(n + 1), target, start, hi, key=cost) - 1
        ends.append(end)
        start = end
        start_cost = cost(end)
    return ends


def _info(n: int, heavy: list[int], encoding: Encoding) -> PartInfo:
    """Build the PartInfo for a scanned body of ``n`` chars."""
    single, concat = _limits(encoding)
    length = n + len(heavy)
    if length <= single:
        return PartInfo(encoding=encoding, parts=1, length=length, per_part=single)
    parts = len(_part_ends(n, heavy, capacity=concat)) if heavy else -(-length // concat)
    return PartInfo(encoding=encoding, parts=parts, length=length, per_part=concat)


def analyse(body: str) -> PartInfo:
    """Detect the encoding of ``body`` and count its length and SMS parts."""
    body, encoding, heavy = _scan(body)
    return _info(len(body), heavy, encoding)


# A binary SMS carries 140 octets of user data per part, its UDH included.
BINARY_OCTETS = 140


def binary_parts(body: str, *, udh: str) -> int:
    """Parts of a binary message (base64 ``body``, hex ``udh``), as Sinch counts them."""
    octets = len(base64.b64decode(body)) + len(bytes.fromhex(udh))  # hex may hold spaces
    return max(1, -(-octets // BINARY_OCTETS))


def split(body: str) -> list[str]:
    """Cut ``body`` into its SMS parts (never splitting an escape or surrogate pair)."""
    body, encoding, heavy = _scan(body)
    single, concat = _limits(encoding)
    n = len(body)
    if n + len(heavy) <= single:
        return [body]
    ends = _part_ends(n, heavy, capacity=concat)
    return [body[start:end] for start, end in pairwise([0, *ends])]


def truncate(body: str, *, max_parts: int) -> str:
    """Return the longest prefix of ``body`` that fits in ``max_parts`` SMS parts."""
    if max_parts < 1:
        raise ValueError(f"max_parts must be >= 1, got {max_parts}")
    body, encoding, heavy = _scan(body)
    n = len(body)
    if _info(n, heavy, encoding).parts <= max_parts:
        return body
    single, concat = _limits(encoding)
    capacity = single if max_parts == 1 else concat
    cut = _part_ends(n, heavy, capacity=capacity, limit=max_parts)[-1]
    if encoding is Encoding.UCS2:
        # A GSM-only leading run may fit further than the UCS-2 cut does.
        match = _NON_GSM_RE.search(body)
        gsm_run = match.start() if match else n
        if gsm_run > cut:
            gsm_heavy = [m.start() for m in _EXT_RE.finditer(body, 0, gsm_run)]
            gsm_capacity = _GSM_SINGLE if max_parts == 1 else _GSM_CONCAT
            ends = _part_ends(gsm_run, gsm_heavy, capacity=gsm_capacity, limit=max_parts)
            cut = max(cut, ends[-1])
    return body[:cut]
