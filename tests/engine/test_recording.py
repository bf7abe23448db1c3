"""What a hand-off's outcome becomes, decided per recipient from a table (no database)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest

from dispatcher.channels.base import Outcome, SendResult
from dispatcher.config import Settings
from dispatcher.engine.recording import Decision, decide, retry_delay
from dispatcher.states import RecipientStatus

R = RecipientStatus
NOW = datetime(2026, 11, 29, 12, 0, 0)
SETTINGS = Settings(database_url="sqlite://", send_retry_schedule=(5.0, 30.0))
CHANNELS = ("rcs", "sms")


@dataclass(frozen=True)
class Row:
    """A claimed recipient, as the claim's RETURNING gives it."""

    id: str = "r1"
    to: str = "+447700900001"
    body: str | None = None
    channel: str = "rcs"
    channel_index: int = 0
    attempts: int = 1
    client_id: str | None = None


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


FAR = at(3600)
REQUEUE = {"claimed_at": None}
CASES: list[tuple[str, Row, SendResult | None, datetime, R, dict[str, Any], bool, bool]] = [
    # name, row, result, expire_at -> status, values (subset), reported, tried again now
    (
        "accepted",
        Row(),
        SendResult(Outcome.ACCEPTED, provider_message_id="p-1"),
        FAR,
        R.SENT,
        {"provider_message_id": "p-1", "provider": "sim", "sent_at": NOW, "error_code": None},
        True,
        False,
    ),
    (
        "never handed over",
        Row(attempts=2),
        None,
        FAR,
        R.QUEUED,
        {"attempts": 1, "channel": "rcs", "enqueued_at": NOW, "next_attempt_at": None},
        False,
        True,
    ),
    (
        "transient, retried later",
        Row(attempts=1),
        SendResult(Outcome.TRANSIENT, error_code="busy", error_text="carrier busy"),
        FAR,
        R.QUEUED,
        {"next_attempt_at": at(5), "enqueued_at": None, "attempts": 1, "error_code": "busy"},
        False,
        False,
    ),
    (
        "transient, Retry-After beyond the schedule",
        Row(attempts=2),
        SendResult(Outcome.TRANSIENT, error_code="busy", retry_after=90),
        FAR,
        R.QUEUED,
        {"next_attempt_at": at(90)},
        False,
        False,
    ),
    (
        "transient, retry past expire_at",
        Row(),
        SendResult(Outcome.TRANSIENT, error_code="busy", error_text="carrier busy"),
        at(5),
        R.EXPIRED,
        {"error_code": "busy", "error_text": "carrier busy", "claimed_at": None},
        True,
        False,
    ),
    (
        "channel refused, next channel",
        Row(attempts=3),
        SendResult(Outcome.CHANNEL, error_code="unreachable", error_text="no rcs"),
        FAR,
        R.QUEUED,
        {"channel_index": 1, "channel": "sms", "attempts": 0, "enqueued_at": NOW},
        False,
        True,
    ),
    (
        "channel refused on the last channel",
        Row(channel="sms", channel_index=1),
        SendResult(Outcome.CHANNEL, error_code="unreachable", error_text="no sms"),
        FAR,
        R.FAILED,
        {"error_code": "unreachable", "error_text": "no sms"},
        True,
        False,
    ),
    (
        "recipient refused",
        Row(),
        SendResult(Outcome.RECIPIENT, error_code="invalid", error_text="number invalid"),
        FAR,
        R.FAILED,
        {"error_code": "invalid", "claimed_at": None},
        True,
        False,
    ),
    (
        "outcome unknown (no submit_sm_resp): final, never tried again",
        Row(channel_index=0),
        SendResult(Outcome.UNKNOWN, error_code="outcome_unknown", error_text="no resp"),
        FAR,
        R.UNKNOWN,
        {"error_code": "outcome_unknown", "claimed_at": None},
        True,
        False,
    ),
]


@pytest.mark.parametrize(
    ("row", "result", "expire_at", "status", "values", "reported", "again"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_each_outcome_decides_status_columns_and_event(
    row: Row,
    result: SendResult | None,
    expire_at: datetime,
    status: R,
    values: dict[str, Any],
    reported: bool,
    again: bool,
) -> None:
    d = decide(
        row,
        result,
        channels=CHANNELS,
        expire_at=expire_at,
        settings=SETTINGS,
        now=NOW,
        provider="sim",
    )
    assert isinstance(d, Decision) and d.recipient_id == row.id
    assert (d.status, d.report, d.again) == (status, reported, again)
    assert {k: d.values[k] for k in values} == values
    assert d.values["claimed_at"] is None  # every outcome releases the claim
    if result is None:
        assert d.attempt is None
    else:
        assert d.attempt is not None
        assert (d.attempt["outcome"], d.attempt["channel"]) == (result.outcome.value, row.channel)


def test_a_decision_is_a_frozen_value() -> None:
    d = decide(Row(), None, channels=CHANNELS, expire_at=FAR, settings=SETTINGS, now=NOW)
    with pytest.raises(AttributeError):
        d.status = R.SENT  # type: ignore[misc]


@pytest.mark.parametrize(
    ("attempt", "retry_after", "delay"),
    [(1, None, 5.0), (2, None, 30.0), (9, None, 30.0), (1, 60.0, 60.0), (2, 1.0, 30.0)],
)
def test_retry_delay_follows_the_schedule_and_retry_after(
    attempt: int, retry_after: float | None, delay: float
) -> None:
    assert retry_delay(settings=SETTINGS, attempt=attempt, retry_after=retry_after) == delay
