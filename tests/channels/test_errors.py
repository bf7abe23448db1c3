"""The shared classification helpers: Retry-After in both of its forms, and the fallbacks."""

from __future__ import annotations

import email.utils

import pytest

from dispatcher.channels.base import Outcome
from dispatcher.channels.errors import MAX_RETRY_AFTER, by_status, classify, failure, retry_after

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30", 30.0),
        ("0.5", 0.5),
        ("-5", 0.0),
        ("99999999", MAX_RETRY_AFTER),
        (email.utils.formatdate(NOW + 120, usegmt=True), 120.0),
        (email.utils.formatdate(NOW - 120, usegmt=True), 0.0),
        ("nan", None),
        ("soon", None),
        ("", None),
    ],
)
def test_retry_after_takes_seconds_or_an_http_date(value: str, seconds: float | None) -> None:
    assert retry_after({"Retry-After": value}, now=NOW) == seconds


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.ACCEPTED),
        (401, Outcome.TRANSIENT),
        (403, Outcome.TRANSIENT),
        (408, Outcome.TRANSIENT),
        (429, Outcome.TRANSIENT),
        (500, Outcome.TRANSIENT),
        (400, Outcome.RECIPIENT),
        (404, Outcome.RECIPIENT),
    ],
)
def test_an_unnamed_answer_is_decided_by_its_status(status: int, outcome: Outcome) -> None:
    assert by_status(status) is outcome


def test_a_named_code_wins_over_the_status() -> None:
    table = {131047: Outcome.CHANNEL}
    assert classify(table, 131047, 400) is Outcome.CHANNEL
    assert classify(table, 1, 400) is Outcome.RECIPIENT
    assert classify(table, None, 503) is Outcome.TRANSIENT


def test_code_and_text_are_cut_to_their_columns() -> None:
    result = failure(Outcome.RECIPIENT, code="x" * 40, text="y" * 600)
    assert len(result.error_code or "") == 32 and len(result.error_text or "") == 500
    assert failure(Outcome.RECIPIENT, code="c", text="").error_text is None
