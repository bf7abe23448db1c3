"""E.164 phone number parsing, via phonenumbers."""

from __future__ import annotations

import phonenumbers
from phonenumbers import PhoneMetadata, PhoneNumber
from phonenumbers import phonenumberutil as pnu

# _test_number_length results after which parse() keeps the national prefix.
_KEEP_PREFIX = (
    pnu.ValidationResult.TOO_SHORT,
    pnu.ValidationResult.IS_POSSIBLE_LOCAL_ONLY,
    pnu.ValidationResult.INVALID_LENGTH,
)


class InvalidNumber(ValueError):
    """Not a possible E.164 mobile number."""


def to_e164(raw: str) -> str:
    """Normalise ``raw`` (with or without the leading +) to E.164, or raise InvalidNumber.

    Possibility (country code and length), not carrier validity, is checked: test
    ranges such as +44 1111 111111, used by the vendors' own examples, must pass.
    """
    text = raw.strip() if isinstance(raw, str) else ""
    if not text or len(text) > 20:
        raise InvalidNumber(f"{raw!r} is not an E.164 number")
    if not text.startswith("+"):
        text = "+" + text
    # ASCII only: str.isdigit() also takes Arabic-Indic or fullwidth digits.
    if not text[1:].isascii() or not text[1:].isdigit():
        raise InvalidNumber(f"{raw!r} is not an E.164 number (digits only, optional +)")
    try:
        number = _parse_plus_digits(text[1:]) or phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException as exc:
        raise InvalidNumber(f"{raw!r} is not an E.164 number") from exc
    if not phonenumbers.is_possible_number(number):
        raise InvalidNumber(f"{raw!r} is not a possible number for its country code")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _parse_plus_digits(digits: str) -> PhoneNumber | None:
    """What ``phonenumbers.parse("+" + digits, None)`` returns, for ASCII digits only.

    Intake parses every destination, and parse()'s general steps (regexes for
    extensions, punctuation, "tel:" URIs, Unicode digits) were over half of the
    API's time per recipient; none of them applies to "+" and ASCII digits, so
    this runs only parse()'s remaining steps, in its order. Anything unusual
    (no country code, too short or long) returns None and goes through parse(),
    which then raises as before. tests/test_phones.py checks both agree.
    """
    cc, national = pnu._extract_country_code(digits)
    if cc == 0 or len(digits) < 3 or len(national) < pnu._MIN_LENGTH_FOR_NSN:
        return None
    region = pnu.region_code_for_country_code(cc)
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(cc, region)
    if metadata is None:
        return None
    _carrier, potential, _stripped = pnu._maybe_strip_national_prefix_carrier_code(
        national, metadata
    )
    if pnu._test_number_length(potential, metadata) not in _KEEP_PREFIX:
        national = potential
    if not pnu._MIN_LENGTH_FOR_NSN <= len(national) <= pnu._MAX_LENGTH_FOR_NSN:
        return None
    number = PhoneNumber(country_code=cc)
    pnu._set_italian_leading_zeros_for_phone_number(national, number)
    number.national_number = int(national)
    return number
