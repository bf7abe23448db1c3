"""E.164 phone number parsing, via phonenumbers."""

from __future__ import annotations

import phonenumbers


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
        number = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException as exc:
        raise InvalidNumber(f"{raw!r} is not an E.164 number") from exc
    if not phonenumbers.is_possible_number(number):
        raise InvalidNumber(f"{raw!r} is not a possible number for its country code")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
