"""Tests for dispatcher.sms.parts: encoding detection, part counting, split, truncate."""

from __future__ import annotations

import base64
import dataclasses
import random

import pytest

from dispatcher.sms.parts import (
    GSM_BASIC,
    GSM_EXTENSION,
    Encoding,
    PartInfo,
    analyse,
    binary_parts,
    split,
    truncate,
)

GSM = Encoding.GSM7
UCS = Encoding.UCS2
EMOJI = "\U0001f600"  # 😀, two UTF-16 code units
EXTENSION_CHARS = "\f^{}\\[~]|€"


def _cost(char: str, encoding: Encoding) -> int:
    """Reference per-character cost, computed the slow obvious way."""
    if encoding is GSM:
        return 2 if char in EXTENSION_CHARS else 1
    return len(char.encode("utf-16-le")) // 2


def _reference_split(body: str) -> list[str]:
    """Character-by-character greedy split used as an oracle."""
    encoding = GSM if all(c in GSM_BASIC or c in GSM_EXTENSION for c in body) else UCS
    single, concat = (160, 153) if encoding is GSM else (70, 67)
    if sum(_cost(c, encoding) for c in body) <= single:
        return [body]
    parts: list[str] = []
    current = ""
    used = 0
    for char in body:
        cost = _cost(char, encoding)
        if used + cost > concat:
            parts.append(current)
            current, used = "", 0
        current += char
        used += cost
    parts.append(current)
    return parts


# --- the tables -----------------------------------------------------------


def test_table_sizes_and_disjoint() -> None:
    assert len(GSM_BASIC) == 127  # 128 code points minus the 0x1B escape
    assert len(GSM_EXTENSION) == 10
    assert not GSM_BASIC & GSM_EXTENSION
    assert set(EXTENSION_CHARS) == GSM_EXTENSION


@pytest.mark.parametrize("char", list("@£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ¤¡ÄÖÑÜ§¿äöñüà\n\r"))
def test_basic_table_specials_are_one_septet(char: str) -> None:
    assert analyse(char) == PartInfo(encoding=GSM, parts=1, length=1, per_part=160)


@pytest.mark.parametrize("char", list(EXTENSION_CHARS))
def test_extension_chars_are_two_septets(char: str) -> None:
    assert analyse(char) == PartInfo(encoding=GSM, parts=1, length=2, per_part=160)


@pytest.mark.parametrize(
    "char",
    ["ą", "ç", "П", "\t", "`", "\x1b", "\u2126", "¢", "中", EMOJI],
)
def test_chars_outside_both_tables_force_ucs2(char: str) -> None:
    info = analyse("hello " + char)
    assert info.encoding is UCS
    assert info.encoding == "UNICODE"


def test_encoding_values_match_sinch_dry_run() -> None:
    assert Encoding.GSM7 == "GSM"
    assert Encoding.UCS2 == "UNICODE"
    assert str(Encoding.UCS2) == "UNICODE"
    assert f"{Encoding.GSM7}" == "GSM"


def test_part_info_is_frozen() -> None:
    info = analyse("hi")
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.parts = 9  # type: ignore[misc]


# --- hand-computed part counts --------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("", PartInfo(encoding=GSM, parts=1, length=0, per_part=160)),
        ("a" * 160, PartInfo(encoding=GSM, parts=1, length=160, per_part=160)),
        ("a" * 161, PartInfo(encoding=GSM, parts=2, length=161, per_part=153)),
        ("a" * 306, PartInfo(encoding=GSM, parts=2, length=306, per_part=153)),
        ("a" * 307, PartInfo(encoding=GSM, parts=3, length=307, per_part=153)),
        ("a" * 459, PartInfo(encoding=GSM, parts=3, length=459, per_part=153)),
        ("a" * 460, PartInfo(encoding=GSM, parts=4, length=460, per_part=153)),
        ("{" * 80, PartInfo(encoding=GSM, parts=1, length=160, per_part=160)),
        ("{" * 81, PartInfo(encoding=GSM, parts=2, length=162, per_part=153)),
        ("a" * 159 + "€", PartInfo(encoding=GSM, parts=2, length=161, per_part=153)),
        ("a" * 158 + "€", PartInfo(encoding=GSM, parts=1, length=160, per_part=160)),
        ("Price: 5€", PartInfo(encoding=GSM, parts=1, length=10, per_part=160)),
        ("page\fbreak", PartInfo(encoding=GSM, parts=1, length=11, per_part=160)),
        ("café", PartInfo(encoding=GSM, parts=1, length=4, per_part=160)),
        ("ą" * 70, PartInfo(encoding=UCS, parts=1, length=70, per_part=70)),
        ("ą" * 71, PartInfo(encoding=UCS, parts=2, length=71, per_part=67)),
        ("ą" * 134, PartInfo(encoding=UCS, parts=2, length=134, per_part=67)),
        ("ą" * 135, PartInfo(encoding=UCS, parts=3, length=135, per_part=67)),
        ("Ж" * 70, PartInfo(encoding=UCS, parts=1, length=70, per_part=70)),
        ("Ж" * 71, PartInfo(encoding=UCS, parts=2, length=71, per_part=67)),
        ("привет", PartInfo(encoding=UCS, parts=1, length=6, per_part=70)),
        (EMOJI, PartInfo(encoding=UCS, parts=1, length=2, per_part=70)),
        (EMOJI * 35, PartInfo(encoding=UCS, parts=1, length=70, per_part=70)),
        (EMOJI * 36, PartInfo(encoding=UCS, parts=2, length=72, per_part=67)),
        # 33 emoji (66 units) per concatenated part: 66 emoji fit in 2 parts, 67 need 3.
        (EMOJI * 66, PartInfo(encoding=UCS, parts=2, length=132, per_part=67)),
        (EMOJI * 67, PartInfo(encoding=UCS, parts=3, length=134, per_part=67)),
        # '{' stays GSM-7 but costs 2 septets.
        ("a" * 150 + "{", PartInfo(encoding=GSM, parts=1, length=152, per_part=160)),
        # One non-GSM char turns a 100-char GSM body into 100 UCS-2 units.
        ("a" * 99 + "ą", PartInfo(encoding=UCS, parts=2, length=100, per_part=67)),
        ("a" * 69 + "`", PartInfo(encoding=UCS, parts=1, length=70, per_part=70)),
    ],
)
def test_analyse_hand_computed(body: str, expected: PartInfo) -> None:
    assert analyse(body) == expected


def test_unsplittable_escape_needs_an_extra_part() -> None:
    # 306 septets would be 2 parts, but the '{' cannot straddle the 153 boundary.
    body = "a" * 152 + "{" + "a" * 152
    assert analyse(body) == PartInfo(encoding=GSM, parts=3, length=306, per_part=153)
    assert split(body) == ["a" * 152, "{" + "a" * 151, "a"]


def test_unsplittable_surrogate_pair_needs_an_extra_part() -> None:
    # 134 units would be 2 parts, but the emoji cannot straddle the 67 boundary.
    body = "ą" * 66 + EMOJI + "ą" * 66
    assert analyse(body) == PartInfo(encoding=UCS, parts=3, length=134, per_part=67)
    assert split(body) == ["ą" * 66, EMOJI + "ą" * 65, "ą"]


def test_separately_stored_surrogates_are_joined() -> None:
    pair = "\ud83d\ude00"  # the two UTF-16 halves of EMOJI as distinct code points
    body = pair * 36
    assert analyse(body) == PartInfo(encoding=UCS, parts=2, length=72, per_part=67)
    parts = split(body)
    assert parts == [EMOJI * 33, EMOJI * 3]
    for part in parts:
        part.encode("utf-16-le")  # strict: raises on a lone surrogate


# --- split ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "sizes"),
    [
        ("", [0]),
        ("a" * 160, [160]),
        ("a" * 161, [153, 8]),
        ("a" * 307, [153, 153, 1]),
        ("{" * 81, [76, 5]),
        ("a" * 152 + "{" + "a" * 10, [152, 11]),
        ("a" * 151 + "{" + "a" * 10, [152, 10]),
        ("ą" * 71, [67, 4]),
        (EMOJI * 36, [33, 3]),
        ("ą" * 66 + EMOJI + "ą" * 3, [66, 4]),
        ("ą" * 66 + EMOJI + "ą", [68]),
    ],
)
def test_split_sizes(body: str, sizes: list[int]) -> None:
    parts = split(body)
    assert [len(p) for p in parts] == sizes
    assert "".join(parts) == body


def test_empty_body_is_one_empty_part() -> None:
    assert split("") == [""]


def _random_bodies() -> list[str]:
    rng = random.Random(20240601)
    gsm_pool = "".join(sorted(GSM_BASIC)) + EXTENSION_CHARS * 8
    ucs_pool = gsm_pool + "ąЖ中" + EMOJI * 6 + "\U0001f44d\U0001f3fd"
    bodies = []
    for pool in (gsm_pool, ucs_pool, "a{" * 3, "ą" + EMOJI):
        for _ in range(60):
            bodies.append("".join(rng.choice(pool) for _ in range(rng.randint(0, 700))))
    return bodies


RANDOM_BODIES = _random_bodies()


@pytest.mark.parametrize("body", RANDOM_BODIES)
def test_split_matches_char_by_char_oracle(body: str) -> None:
    parts = split(body)
    assert parts == _reference_split(body)
    assert "".join(parts) == body
    info = analyse(body)
    assert info.parts == len(parts)
    for part in parts:
        # cost in the whole body's encoding (a slice may itself be GSM-only)
        assert sum(_cost(c, info.encoding) for c in part) <= info.per_part
        # never a lone surrogate, never a dangling escape
        part.encode("utf-16-le")


# --- truncate -------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "max_parts", "expected"),
    [
        ("short", 1, "short"),
        ("", 1, ""),
        ("a" * 200, 1, "a" * 160),
        ("a" * 400, 2, "a" * 306),
        ("a" * 400, 3, "a" * 400),
        ("{" * 100, 1, "{" * 80),
        ("a" * 159 + "{", 1, "a" * 159),
        ("a" * 152 + "{" + "a" * 200, 2, "a" * 152 + "{" + "a" * 151),
        ("ą" * 100, 1, "ą" * 70),
        ("ą" * 200, 2, "ą" * 134),
        (EMOJI * 40, 1, EMOJI * 35),
        ("ą" * 69 + EMOJI, 1, "ą" * 69),
        # The GSM-only prefix fits further than the UCS-2 cut would.
        ("a" * 200 + "ą", 2, "a" * 200),
        ("a" * 200 + "ą", 3, "a" * 200 + "ą"),
        ("a" * 100 + "ą" * 10, 1, "a" * 100),
    ],
)
def test_truncate_hand_computed(body: str, max_parts: int, expected: str) -> None:
    assert truncate(body, max_parts=max_parts) == expected


@pytest.mark.parametrize("max_parts", [1, 2, 3, 5])
@pytest.mark.parametrize("body", RANDOM_BODIES[::7])
def test_truncate_is_longest_fitting_prefix(body: str, max_parts: int) -> None:
    result = truncate(body, max_parts=max_parts)
    assert body.startswith(result)
    assert analyse(result).parts <= max_parts
    result.encode("utf-16-le")
    if result != body:
        assert analyse(body[: len(result) + 1]).parts > max_parts


@pytest.mark.parametrize("max_parts", [0, -1])
def test_truncate_rejects_non_positive_max_parts(max_parts: int) -> None:
    with pytest.raises(ValueError, match="max_parts"):
        truncate("hello", max_parts=max_parts)


def test_truncate_max_parts_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        truncate("hello", 1)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("payload", "udh", "expected"),
    [
        (134, "050003cc0201", 1),  # 134 + 6 octets: one part of 140
        (135, "050003cc0201", 2),
        (134, "05 00 03 cc 02 01", 1),  # spaces between the hex octets count for nothing
        (0, "", 1),
    ],
)
def test_binary_parts_count_octets_with_the_udh(payload: int, udh: str, expected: int) -> None:
    body = base64.b64encode(bytes(payload)).decode()
    assert binary_parts(body, udh=udh) == expected
