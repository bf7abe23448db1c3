"""E.164 phone number parsing, via phonenumbers."""

from __future__ import annotations

import re
from functools import cache
from typing import NamedTuple

import phonenumbers
from phonenumbers import PhoneMetadata
from phonenumbers import phonenumberutil as pnu

# _test_number_length results after which parse() keeps the national prefix.
_KEEP_PREFIX = (
    pnu.ValidationResult.TOO_SHORT,
    pnu.ValidationResult.IS_POSSIBLE_LOCAL_ONLY,
    pnu.ValidationResult.INVALID_LENGTH,
)
_POSSIBLE = (pnu.ValidationResult.IS_POSSIBLE, pnu.ValidationResult.IS_POSSIBLE_LOCAL_ONLY)
# Every country calling code as text: its first 1-3 digits are looked up here.
_CALLING_CODES = frozenset(str(cc) for cc in pnu.COUNTRY_CODE_TO_REGION_CODE)


class InvalidNumber(ValueError):
    """Not a possible E.164 mobile number."""


class _Country(NamedTuple):
    """What parsing needs of one calling code's metadata, looked up once per process."""

    metadata: PhoneMetadata
    # national_prefix_for_parsing, compiled; None when the plan has none.
    prefix: re.Pattern[str] | None
    # National lengths is_possible_number accepts (it checks only the length).
    possible: frozenset[int]


def to_e164(raw: str) -> str:
    """Normalise ``raw`` (with or without the leading +) to E.164, or raise InvalidNumber.

    Possibility (country code and length), not carrier validity, is checked: test
    ranges such as +44 1111 111111, used by the vendors' own examples, must pass.
    """
    text = raw.strip() if isinstance(raw, str) else ""
    if not text or len(text) > 20:
        raise InvalidNumber(f"{raw!r} is not an E.164 number")
    digits = text[1:] if text.startswith("+") else text
    # ASCII only: str.isdigit() also takes Arabic-Indic or fullwidth digits.
    if not digits.isascii() or not digits.isdigit():
        raise InvalidNumber(f"{raw!r} is not an E.164 number (digits only, optional +)")
    split = split_plus_digits(digits)
    if split is None:
        return _parsed(raw, "+" + digits)
    cc, national, possible = split
    if not possible:
        raise InvalidNumber(f"{raw!r} is not a possible number for its country code")
    return f"+{cc}{national}"


def plain_e164(raw: str) -> str | None:
    """``to_e164(raw)`` for the usual number, already E.164 apart from an optional "+"
    and with no national prefix to strip; None for anything else (``to_e164`` then
    decides, and explains a refusal).

    Intake's hottest loop: the same steps as ``split_plus_digits``, without the
    work a number in that form never needs (stripping, the prefix's removal,
    building the result again: it is "+" and its digits), and with the calling
    code found from the first three digits in one look-up.
    """
    digits = raw[1:] if raw[:1] == "+" else raw
    if len(raw) > 20 or len(digits) < 3 or not (digits.isdigit() and digits.isascii()):
        return None
    plan = _plan(digits[:3])
    if plan is None:
        return None
    size, country = plan
    national = len(digits) - size
    if national < pnu._MIN_LENGTH_FOR_NSN or national not in country.possible:
        return None
    if country.prefix is not None and country.prefix.match(digits[size:]):
        return None
    return "+" + digits


@cache
def _plan(head: str) -> tuple[int, _Country] | None:
    """The calling code's length and plan of numbers whose first three digits are ``head``
    (None: no such code, or it starts with 0)."""
    if head[0] == "0":
        return None
    for size in (1, 2, 3):
        if head[:size] in _CALLING_CODES:
            country = _country(int(head[:size]))
            return None if country is None else (size, country)
    return None


def _parsed(raw: str, text: str) -> str:
    """phonenumbers' general route: parse(), is_possible_number(), format_number()."""
    try:
        number = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException as exc:
        raise InvalidNumber(f"{raw!r} is not an E.164 number") from exc
    if not phonenumbers.is_possible_number(number):
        raise InvalidNumber(f"{raw!r} is not a possible number for its country code")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


@cache
def _country(cc: int) -> _Country | None:
    region = pnu.region_code_for_country_code(cc)
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(cc, region)
    if metadata is None:
        return None
    prefix = metadata.national_prefix_for_parsing
    lengths = range(pnu._MAX_LENGTH_FOR_NSN + 1)
    return _Country(
        metadata=metadata,
        prefix=re.compile(prefix) if prefix else None,
        possible=frozenset(
            n for n in lengths if pnu._test_number_length("0" * n, metadata) in _POSSIBLE
        ),
    )


def split_plus_digits(digits: str) -> tuple[int, str, bool] | None:
    """The calling code and national significant number ``parse("+" + digits)`` finds,
    and whether ``is_possible_number`` accepts them; ASCII digits only.

    Intake parses every destination, and parse()'s general steps (regexes for
    extensions, punctuation, "tel:" URIs, Unicode digits) were over half of the
    API's time per recipient; none of them applies to "+" and ASCII digits, so
    this runs only parse()'s remaining steps, in its order, with each calling
    code's metadata looked up once. The national significant number is then
    ``national`` itself (parse() keeps Italian leading zeros), and possibility
    depends only on its length. Anything unusual (no country code, too short or
    long) returns None and goes through parse(), which then raises as before.
    tests/test_phones.py checks both agree.
    """
    if len(digits) < 3 or digits[0] == "0":
        return None
    for size in (1, 2, 3):
        if digits[:size] in _CALLING_CODES:
            break
    else:
        return None
    cc, national = int(digits[:size]), digits[size:]
    if len(national) < pnu._MIN_LENGTH_FOR_NSN:
        return None
    country = _country(cc)
    if country is None:
        return None
    if country.prefix is not None and country.prefix.match(national):
        _carrier, potential, _stripped = pnu._maybe_strip_national_prefix_carrier_code(
            national, country.metadata
        )
        if pnu._test_number_length(potential, country.metadata) not in _KEEP_PREFIX:
            national = potential
    if not pnu._MIN_LENGTH_FOR_NSN <= len(national) <= pnu._MAX_LENGTH_FOR_NSN:
        return None
    return cc, national, len(national) in country.possible
