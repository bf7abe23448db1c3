"""E.164 parsing: the fast path for "+digits" agrees with phonenumbers.parse everywhere."""

from __future__ import annotations

from collections.abc import Iterator

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.phones import InvalidNumber, plain_e164, split_plus_digits, to_e164


def _slow(text: str) -> str:
    """to_e164 as it was: phonenumbers.parse for everything."""
    try:
        number = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException as exc:
        raise InvalidNumber(text) from exc
    if not phonenumbers.is_possible_number(number):
        raise InvalidNumber(text)
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _outcome(fn: object, text: str) -> str:
    try:
        return fn(text)  # type: ignore[operator]
    except InvalidNumber:
        return "invalid"


# Country codes of 1-3 digits, national prefixes, Italian leading zeros, short and long.
TRICKY = [
    "+447700900123",
    "+4407700900123",
    "+44",
    "+4",
    "+1",
    "+12025550143",
    "+112025550143",
    "+390612345678",
    "+3906123456",
    "+39312345678",
    "+79161234567",
    "+8801234567",
    "+80012345678",
    "+97912345678",
    "+882123456789",
    "+0123456789",
    "+999123456",
    "+2250712345678",
    "+54911234567890",
    "+5491123456789",
    "+61041234567",
    "+123456789012345678",
]


@pytest.mark.parametrize("text", TRICKY)
def test_fast_path_agrees_on_known_cases(text: str) -> None:
    assert _outcome(to_e164, text) == _outcome(_slow, text)


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet="0123456789", min_size=1, max_size=19))
def test_fast_path_agrees_on_any_digits(digits: str) -> None:
    text = "+" + digits
    assert _outcome(to_e164, text) == _outcome(_slow, text)
    fast = split_plus_digits(digits)
    if fast is not None:
        number = phonenumbers.parse(text, None)
        national = phonenumbers.national_significant_number(number)
        assert fast == (number.country_code, national, phonenumbers.is_possible_number(number))


def _every_calling_code() -> Iterator[str]:
    """Numbers of every calling code, with nationals of every length that start like a
    prefix might (national prefixes, carrier codes and transform rules differ per plan)."""
    starts = ("0", "00", "1", "15", "8", "9", "7")
    for cc in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
        for start in starts:
            for length in range(1, 16):
                yield f"+{cc}{(start + '2345678901234567')[:length]}"


def test_fast_path_agrees_for_every_calling_code() -> None:
    for text in _every_calling_code():
        assert _outcome(to_e164, text) == _outcome(_slow, text), text


def _plain(text: str) -> str:
    """plain_e164, or to_e164 where it declines (as the intake loop uses them)."""
    return plain_e164(text) or to_e164(text)


@pytest.mark.parametrize("text", TRICKY + [t[1:] for t in TRICKY] + [" +447700900123"])
def test_plain_path_agrees_on_known_cases(text: str) -> None:
    assert _outcome(_plain, text) == _outcome(to_e164, text)


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet="0123456789", min_size=1, max_size=21), st.booleans())
def test_plain_path_agrees_on_any_digits(digits: str, plus: bool) -> None:
    text = ("+" if plus else "") + digits
    assert _outcome(_plain, text) == _outcome(to_e164, text)


def test_plain_path_agrees_for_every_calling_code() -> None:
    for text in _every_calling_code():
        assert _outcome(_plain, text) == _outcome(to_e164, text), text


def test_plain_path_takes_the_usual_numbers() -> None:
    assert plain_e164("+447700900123") == plain_e164("447700900123") == "+447700900123"
    assert plain_e164("+12025550143") == "+12025550143"
    # A national prefix to strip, whitespace, too long: to_e164 decides.
    assert plain_e164("+4407700900123") is None
    assert plain_e164(" +447700900123") is None
    assert plain_e164("+" + "4" * 20) is None
