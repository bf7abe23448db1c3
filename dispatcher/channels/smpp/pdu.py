"""What goes inside SMPP PDUs: text codecs, concatenation UDH, addresses, times, receipts.

Pure functions, no I/O: the connector and the tests' SMSC share them.

GSM-7 travels unpacked (one septet per octet), as SMPP 3.4 carries
``data_coding`` 0; extension characters are the escape 0x1B plus their code.
UCS-2 is UTF-16BE (characters outside the BMP as surrogate pairs, as handsets
do). Long bodies are cut by :func:`dispatcher.sms.parts.split`, so the number
of ``submit_sm`` is exactly the part count Dispatcher computed and billed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from dispatcher.sms import parts as sms_parts

# GSM 03.38 basic table, in code order (0x1B is the escape to the extension table).
GSM_BASIC_TABLE = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM_EXTENSION_TABLE = {
    "\f": 0x0A,
    "^": 0x14,
    "{": 0x28,
    "}": 0x29,
    "\\": 0x2F,
    "[": 0x3C,
    "~": 0x3D,
    "]": 0x3E,
    "|": 0x40,
    "€": 0x65,
}
ESCAPE = 0x1B
_ENCODE = {c: i for i, c in enumerate(GSM_BASIC_TABLE) if i != ESCAPE}
_DECODE_EXT = {v: k for k, v in GSM_EXTENSION_TABLE.items()}
# The ASCII characters of the basic table, and ASCII -> GSM-7 code as a bytes.translate table.
_ASCII_BASIC = bytes(ord(c) for c in _ENCODE if c.isascii())
_ASCII_TO_GSM = bytes(_ENCODE.get(chr(b), 0) for b in range(256))

DC_DEFAULT = 0x00  # the SMSC's default alphabet (GSM-7 unless the SMSC says otherwise)
DC_LATIN1 = 0x03
DC_BINARY = 0x04  # 8-bit data
DC_UCS2 = 0x08
# General data coding with a message class (GSM 03.38 section 4): class 0 is "flash",
# shown at once and not stored. Keeps the alphabet bits (GSM-7 0x10, 8-bit 0x14, UCS-2 0x18).
DC_CLASS0 = 0x10
ALPHABETS = ("gsm7", "latin1", "ascii")

# SMPP 3.4 optional parameter tags (section 5.3.2).
TLV_RECEIPTED_MESSAGE_ID = 0x001E
TLV_MESSAGE_PAYLOAD = 0x0424
TLV_MESSAGE_STATE = 0x0427

ESM_UDHI = 0x40
ESM_RECEIPT = 0x04  # SMSC delivery receipt (message type bits 2-5 == 0001)
ESM_TYPE_MASK = 0x3C


def gsm7_encode(text: str) -> bytes:
    """Unpacked GSM-7 septets; raises ValueError on a character outside GSM 03.38."""
    out = bytearray()
    for ch in text:
        code = _ENCODE.get(ch)
        if code is not None:
            out.append(code)
            continue
        ext = GSM_EXTENSION_TABLE.get(ch)
        if ext is None:
            raise ValueError(f"{ch!r} is not in the GSM 03.38 alphabet")
        out += bytes((ESCAPE, ext))
    return bytes(out)


def gsm7_decode(data: bytes) -> str:
    """Text from unpacked GSM-7 septets (an unknown escape reads as a space, as 03.38 says)."""
    out = []
    escaped = False
    for b in data:
        if escaped:
            out.append(_DECODE_EXT.get(b, " "))
            escaped = False
        elif b == ESCAPE:
            escaped = True
        elif b < len(GSM_BASIC_TABLE):
            out.append(GSM_BASIC_TABLE[b])
        else:
            out.append("?")
    return "".join(out)


def ucs2_encode(text: str) -> bytes:
    return text.encode("utf-16-be", "surrogatepass")


def ucs2_decode(data: bytes) -> str:
    return data.decode("utf-16-be", "replace")


def decode_text(data: bytes, data_coding: int, *, alphabet: str = "gsm7") -> str:
    """The text of a short message in ``data_coding`` (0 means the SMSC's default alphabet)."""
    if data_coding == DC_UCS2:
        return ucs2_decode(data)
    if data_coding == DC_LATIN1 or (data_coding == DC_DEFAULT and alphabet == "latin1"):
        return data.decode("latin-1")
    if data_coding == DC_DEFAULT and alphabet == "ascii":
        return data.decode("ascii", "replace")
    if data_coding in (DC_DEFAULT, 0x01, 0xF0):
        return gsm7_decode(data)
    return data.decode("latin-1")


@dataclass(frozen=True)
class Encoded:
    """A body ready for ``submit_sm``: its data_coding, esm_class and one payload per part."""

    data_coding: int
    esm_class: int
    payloads: list[bytes]


def _ucs2_chunks(body: str) -> list[str]:
    """UCS-2 parts of 70 (single) or 67 UTF-16 units, never splitting a surrogate pair."""
    units = [2 if ord(c) > 0xFFFF else 1 for c in body]
    if sum(units) <= 70:
        return [body]
    chunks, start, used = [], 0, 0
    for i, u in enumerate(units):
        if used + u > 67:
            chunks.append(body[start:i])
            start, used = i, 0
        used += u
    chunks.append(body[start:])
    return chunks


def encode_body(
    body: str, *, reference: int, alphabet: str = "gsm7", data_coding: int = DC_DEFAULT
) -> Encoded:
    """Encode ``body`` in as many parts as Dispatcher bills, with a concatenation UDH if long.

    ``reference`` (0-255) tells this message's parts apart from another's at the handset.
    ``data_coding`` 8 sends every body as UCS-2 (a carrier that wants nothing else).
    """
    if data_coding != DC_UCS2 and len(body) <= 160 and body.isascii():
        # The usual message, one part of basic-table ASCII: two C-level translates
        # instead of the part analysis and a loop per character.
        raw = body.encode("ascii")
        if not raw.translate(None, _ASCII_BASIC):
            return Encoded(
                DC_DEFAULT, 0, [raw.translate(_ASCII_TO_GSM) if alphabet == "gsm7" else raw]
            )
    gsm = sms_parts.analyse(body).encoding is sms_parts.Encoding.GSM7
    if data_coding == DC_UCS2:
        gsm = False
    chunks = sms_parts.split(body) if gsm or data_coding != DC_UCS2 else _ucs2_chunks(body)
    encode: Callable[[str], bytes]
    if gsm and alphabet == "gsm7":
        data_coding, encode = DC_DEFAULT, gsm7_encode
    elif gsm and _fits(body, alphabet):
        codec = "latin-1" if alphabet == "latin1" else "ascii"
        data_coding, encode = DC_DEFAULT, (lambda s: s.encode(codec))
    else:
        data_coding, encode = DC_UCS2, ucs2_encode
    if len(chunks) == 1:
        return Encoded(data_coding, 0, [encode(chunks[0])])
    total = len(chunks)
    ref = reference & 0xFF
    payloads = [
        bytes((0x05, 0x00, 0x03, ref, total, i)) + encode(chunk)
        for i, chunk in enumerate(chunks, start=1)
    ]
    return Encoded(data_coding, ESM_UDHI, payloads)


def encode_binary(payload: bytes, *, udh: bytes) -> Encoded:
    """A binary message (Sinch ``mt_binary``): 8-bit data, its UDH (length octet first) ahead."""
    return Encoded(DC_BINARY, ESM_UDHI if udh else 0, [udh + payload])


def flash(encoded: Encoded) -> Encoded:
    """The same message as class 0 ("flash"), where its data_coding has a class-0 form."""
    alphabet = {DC_DEFAULT: 0x00, DC_BINARY: 0x04, DC_UCS2: 0x08}.get(encoded.data_coding)
    if alphabet is None:
        return encoded
    return Encoded(DC_CLASS0 | alphabet, encoded.esm_class, encoded.payloads)


def _fits(body: str, alphabet: str) -> bool:
    try:
        body.encode("latin-1" if alphabet == "latin1" else "ascii")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class Concat:
    """The concatenation header of one part: reference, total parts, this part's number."""

    reference: int
    total: int
    number: int


def split_udh(payload: bytes, esm_class: int) -> tuple[Concat | None, bytes]:
    """The concatenation info of a part (8- or 16-bit reference) and its text bytes."""
    if not esm_class & ESM_UDHI or not payload:
        return None, payload
    length = payload[0]
    header, rest = payload[1 : 1 + length], payload[1 + length :]
    concat = None
    i = 0
    while i + 2 <= len(header):
        iei, iel = header[i], header[i + 1]
        data = header[i + 2 : i + 2 + iel]
        if iei == 0x00 and iel == 3 and len(data) == 3:
            concat = Concat(data[0], data[1], data[2])
        elif iei == 0x08 and iel == 4 and len(data) == 4:
            concat = Concat((data[0] << 8) | data[1], data[2], data[3])
        i += 2 + iel
    return concat, rest


@dataclass(frozen=True)
class Address:
    addr: str
    ton: int
    npi: int


# (TON, NPI) per kind of source address, overridable in the configuration.
DEFAULT_SOURCE_RULES = {
    "alphanumeric": (5, 0),
    "international": (1, 1),
    "short_code": (3, 0),
}
_DIGITS = re.compile(r"^\+?[0-9]+$")


def source_address(
    sender: str,
    *,
    rules: dict[str, tuple[int, int]] | None = None,
    short_code_max: int = 8,
) -> Address:
    """TON/NPI of a sender: ``+``/long number international, short digits short code, else alpha."""
    rules = rules or DEFAULT_SOURCE_RULES
    if _DIGITS.match(sender):
        digits = sender.lstrip("+")
        kind = (
            "short_code"
            if not sender.startswith("+") and len(digits) <= short_code_max
            else "international"
        )
        ton, npi = rules[kind]
        return Address(digits, ton, npi)
    ton, npi = rules["alphanumeric"]
    return Address(sender, ton, npi)


def destination_address(to: str) -> Address:
    """An E.164 destination: international TON/NPI, without the ``+``."""
    return Address(to.lstrip("+"), 1, 1)


def validity_period(expire_at: datetime | None, *, now: datetime) -> str:
    """SMPP relative validity (``YYMMDDhhmmss000R``) until ``expire_at``, capped at 99 days."""
    if expire_at is None:
        return ""
    seconds = int((expire_at - now).total_seconds())
    seconds = max(60, min(seconds, 99 * 86400))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"0000{days:02d}{hours:02d}{minutes:02d}{secs:02d}000R"


# SMPP 3.4 section 5.2.28 message_state values and the receipt text's stat words.
MESSAGE_STATES = {
    1: "ENROUTE",
    2: "DELIVRD",
    3: "EXPIRED",
    4: "DELETED",
    5: "UNDELIV",
    6: "ACCEPTD",
    7: "UNKNOWN",
    8: "REJECTD",
}
# stat -> the receipt status Dispatcher applies ("enroute" is not final and changes nothing).
STAT_STATUS = {
    "DELIVRD": "delivered",
    # message_state 6 is final: the message was accepted on the subscriber's behalf.
    "ACCEPTD": "delivered",
    "EXPIRED": "expired",
    "DELETED": "failed",
    "UNDELIV": "failed",
    "UNKNOWN": "failed",
    "REJECTD": "failed",
    "ENROUTE": "enroute",
}

_RECEIPT_FIELD = re.compile(r"(id|sub|dlvrd|submit date|done date|stat|err|text):", re.IGNORECASE)


def parse_receipt_text(text: str) -> dict[str, str]:
    """The fields of a receipt's text (``id:… sub:… … stat:DELIVRD err:000 text:…``)."""
    fields: dict[str, str] = {}
    matches = list(_RECEIPT_FIELD.finditer(text))
    for m, nxt in zip(matches, [*matches[1:], None], strict=True):
        end = nxt.start() if nxt else len(text)
        name = m.group(1).lower()
        if name in fields:
            continue
        value = text[m.end() : end]
        fields[name] = value if name == "text" else value.strip()
    return fields


def parse_receipt_date(value: str | None) -> datetime | None:
    """``YYMMDDhhmm`` or ``YYMMDDhhmmss`` (UTC) as a naive UTC datetime; None if unreadable."""
    if not value or not value.isdigit() or len(value) not in (10, 12):
        return None
    # Slices, not strptime: one per receipt, and strptime was a visible share of the CPU.
    yy, month, day, hour, minute, second = (
        int(value[i : i + 2]) if i < len(value) else 0 for i in range(0, 12, 2)
    )
    try:
        return datetime((2000 if yy < 69 else 1900) + yy, month, day, hour, minute, second)
    except ValueError:
        return None


@functools.lru_cache(maxsize=64)
def receipt_date(at: datetime) -> str:
    """``YYMMDDhhmm`` as receipts carry it."""
    return at.astimezone(UTC).strftime("%y%m%d%H%M") if at.tzinfo else at.strftime("%y%m%d%H%M")


def receipt_text(
    *, message_id: str, stat: str, submitted: datetime, done: datetime, err: str = "000"
) -> str:
    """A receipt's text in the de-facto format of SMPP 3.4 Appendix B (for the local SMSC)."""
    delivered = "001" if stat == "DELIVRD" else "000"
    return (
        f"id:{message_id} sub:001 dlvrd:{delivered} submit date:{receipt_date(submitted)} "
        f"done date:{receipt_date(done)} stat:{stat} err:{err} text:"
    )


__all__ = [
    "ALPHABETS",
    "DEFAULT_SOURCE_RULES",
    "MESSAGE_STATES",
    "STAT_STATUS",
    "Address",
    "Concat",
    "Encoded",
    "decode_text",
    "destination_address",
    "encode_binary",
    "encode_body",
    "flash",
    "gsm7_decode",
    "gsm7_encode",
    "parse_receipt_date",
    "parse_receipt_text",
    "receipt_text",
    "source_address",
    "split_udh",
    "validity_period",
]
