"""SMPP 3.4 command_status values and what each means for a recipient."""

from __future__ import annotations

from dispatcher.channels.base import Outcome

ESME_ROK = 0x00
ESME_RSYSERR = 0x08
ESME_RMSGQFUL = 0x14
ESME_RTHROTTLED = 0x58

NAMES = {
    0x00: "ESME_ROK",
    0x01: "ESME_RINVMSGLEN",
    0x02: "ESME_RINVCMDLEN",
    0x03: "ESME_RINVCMDID",
    0x04: "ESME_RINVBNDSTS",
    0x05: "ESME_RALYBND",
    0x06: "ESME_RINVPRTFLG",
    0x07: "ESME_RINVREGDLVFLG",
    0x08: "ESME_RSYSERR",
    0x0A: "ESME_RINVSRCADR",
    0x0B: "ESME_RINVDSTADR",
    0x0C: "ESME_RINVMSGID",
    0x0D: "ESME_RBINDFAIL",
    0x0E: "ESME_RINVPASWD",
    0x0F: "ESME_RINVSYSID",
    0x14: "ESME_RMSGQFUL",
    0x15: "ESME_RINVSERTYP",
    0x33: "ESME_RINVNUMDESTS",
    0x45: "ESME_RSUBMITFAIL",
    0x48: "ESME_RINVSRCTON",
    0x49: "ESME_RINVSRCNPI",
    0x50: "ESME_RINVDSTTON",
    0x51: "ESME_RINVDSTNPI",
    0x58: "ESME_RTHROTTLED",
    0x61: "ESME_RINVSCHED",
    0x62: "ESME_RINVEXPIRY",
    0x63: "ESME_RINVDFTMSGID",
    0x64: "ESME_RX_T_APPN",
    0x65: "ESME_RX_P_APPN",
    0x66: "ESME_RX_R_APPN",
    0x67: "ESME_RQUERYFAIL",
    0xC0: "ESME_RINVOPTPARSTREAM",
    0xC1: "ESME_ROPTPARNOTALLWD",
    0xC2: "ESME_RINVPARLEN",
    0xC3: "ESME_RMISSINGOPTPARAM",
    0xC4: "ESME_RINVOPTPARAMVAL",
    0xFE: "ESME_RDELIVERYFAILURE",
    0xFF: "ESME_RUNKNOWNERR",
}

# The SMSC is busy: slow this connection down and try again later.
THROTTLING = frozenset({ESME_RTHROTTLED, ESME_RMSGQFUL})
# Passing trouble at the SMSC or on the bind: try again later.
TRANSIENT = THROTTLING | {0x04, 0x08, 0x45, 0x64, 0xFE, 0xFF}
# The destination itself is wrong: no channel will reach it.
RECIPIENT = frozenset({0x0B, 0x33, 0x50, 0x51, 0x66})


def name(status: int) -> str:
    return NAMES.get(status, f"0x{status:08X}")


def classify(status: int) -> Outcome:
    """What a failed submit_sm_resp means; anything else (content, source, coding) falls back."""
    if status == ESME_ROK:
        return Outcome.ACCEPTED
    if status in TRANSIENT:
        return Outcome.TRANSIENT
    if status in RECIPIENT:
        return Outcome.RECIPIENT
    return Outcome.CHANNEL
