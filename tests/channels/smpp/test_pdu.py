"""PDU contents: GSM 03.38 and UCS-2 bytes, concatenation, addresses, receipts."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from dispatcher.channels.smpp import pdu
from dispatcher.sms import parts


def test_gsm7_bytes_are_the_03_38_codes_with_escapes_for_extension_characters() -> None:
    assert pdu.gsm7_encode("@£$") == b"\x00\x01\x02"
    assert pdu.gsm7_encode("€{}") == b"\x1b\x65\x1b\x28\x1b\x29"
    assert pdu.gsm7_encode("Hello") == b"Hello"
    with pytest.raises(ValueError):
        pdu.gsm7_encode("😀")


@pytest.mark.parametrize("text", ["Hello € { } [ ] ~ | ^ \\", "ΔΦΓΛΩΠΨΣΘΞ äöñüà ÆæßÉ", "@\n\r"])
def test_gsm7_round_trip(text: str) -> None:
    assert pdu.gsm7_decode(pdu.gsm7_encode(text)) == text


def test_ucs2_is_utf16_big_endian_with_surrogate_pairs() -> None:
    assert pdu.ucs2_encode("€😀") == b"\x20\xac\xd8\x3d\xde\x00"
    assert pdu.ucs2_decode(pdu.ucs2_encode("Привет 😀")) == "Привет 😀"


@pytest.mark.parametrize(
    "body",
    [
        "short",
        "x" * 160,
        "x" * 161,
        "€" * 80,
        "€" * 81 + "a" * 300,
        "😀" * 35,
        "😀" * 36,
        "é" * 1000,
    ],
)
def test_parts_match_what_dispatcher_bills(body: str) -> None:
    encoded = pdu.encode_body(body, reference=9)
    assert len(encoded.payloads) == parts.analyse(body).parts
    if len(encoded.payloads) > 1:
        assert encoded.esm_class == pdu.ESM_UDHI
        texts = []
        for i, payload in enumerate(encoded.payloads, 1):
            concat, rest = pdu.split_udh(payload, encoded.esm_class)
            assert concat == pdu.Concat(9, len(encoded.payloads), i)
            assert len(rest) <= 153 if encoded.data_coding == 0 else len(rest) <= 134
            texts.append(pdu.decode_text(rest, encoded.data_coding))
        assert "".join(texts) == body
    else:
        assert pdu.decode_text(encoded.payloads[0], encoded.data_coding) == body


def test_ucs2_as_the_carrier_default_keeps_within_67_units_per_part() -> None:
    encoded = pdu.encode_body("a" * 100 + "😀", reference=1, data_coding=pdu.DC_UCS2)
    assert encoded.data_coding == pdu.DC_UCS2
    assert len(encoded.payloads) == 2
    assert all(len(p) - 6 <= 134 for p in encoded.payloads)


def test_latin1_alphabet_sends_gsm_bodies_in_latin1_and_the_rest_in_ucs2() -> None:
    assert pdu.encode_body("café", reference=1, alphabet="latin1").payloads == [b"caf\xe9"]
    assert pdu.encode_body("Δ", reference=1, alphabet="latin1").data_coding == pdu.DC_UCS2


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("Dispatcher", pdu.Address("Dispatcher", 5, 0)),
        ("+447700900123", pdu.Address("447700900123", 1, 1)),
        ("447700900123", pdu.Address("447700900123", 1, 1)),
        ("12345", pdu.Address("12345", 3, 0)),
    ],
)
def test_source_address_rules(sender: str, expected: pdu.Address) -> None:
    assert pdu.source_address(sender) == expected


def test_validity_period_is_relative_and_bounded() -> None:
    now = datetime(2026, 1, 1)
    assert pdu.validity_period(None, now=now) == ""
    assert pdu.validity_period(now + timedelta(days=1, hours=2, seconds=5), now=now) == (
        "000001020005000R"
    )
    assert pdu.validity_period(now - timedelta(hours=1), now=now) == "000000000100000R"


def test_receipt_text_fields() -> None:
    text = (
        "id:0123456789 sub:001 dlvrd:001 submit date:2501011200 done date:2501011201 "
        "stat:UNDELIV err:034 text:hello there"
    )
    fields = pdu.parse_receipt_text(text)
    assert fields["id"] == "0123456789"
    assert fields["stat"] == "UNDELIV"
    assert fields["err"] == "034"
    assert fields["text"] == "hello there"
    assert pdu.parse_receipt_date(fields["done date"]) == datetime(2025, 1, 1, 12, 1)
    assert pdu.parse_receipt_date("garbage") is None


def test_every_stat_maps_to_a_status() -> None:
    assert set(pdu.STAT_STATUS) == set(pdu.MESSAGE_STATES.values())
    assert pdu.STAT_STATUS["DELIVRD"] == "delivered"
    assert pdu.STAT_STATUS["EXPIRED"] == "expired"
    assert {pdu.STAT_STATUS[s] for s in ("DELETED", "UNDELIV", "UNKNOWN", "REJECTD")} == {"failed"}
    assert pdu.STAT_STATUS["ENROUTE"] == "enroute"
