"""Structured logs: JSON lines with ids, text for humans, a Sentry scrubber that keeps secrets."""

from __future__ import annotations

import io
import json
import logging

import pytest

from dispatcher import logs
from dispatcher.config import ConfigError, Settings


def _emit(formatter: logging.Formatter, **extra: object) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("dispatcher.test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("batch %s stalled", "b-1", extra=extra)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    return stream.getvalue()


def test_json_line_has_level_timestamp_logger_and_ids() -> None:
    with logs.bind(account_id="acct-1", task_id="t-9"), logs.bind(batch_id="b-1"):
        line = json.loads(_emit(logs.JsonFormatter(), recipient_id="r-3"))
    assert line["level"] == "WARNING"
    assert line["logger"] == "dispatcher.test_logs"
    assert line["message"] == "batch b-1 stalled"
    assert line["timestamp"].endswith("+00:00")
    assert (line["account_id"], line["batch_id"], line["recipient_id"], line["task_id"]) == (
        "acct-1",
        "b-1",
        "r-3",
        "t-9",
    )
    # Outside the block the context is gone.
    assert "account_id" not in json.loads(_emit(logs.JsonFormatter()))


def test_one_line_per_event_even_with_a_traceback() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("dispatcher.test_logs.exc")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed", extra={"callback_id": "cb-1"})
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert "ValueError: boom" in record["exception"]
    assert record["callback_id"] == "cb-1"


def test_text_format_for_humans() -> None:
    text = _emit(logs.TextFormatter(), batch_id="b-2")
    assert "WARNING" in text and "dispatcher.test_logs: batch b-1 stalled" in text
    assert text.rstrip().endswith("batch_id=b-2")
    assert not text.startswith("{")


def test_log_format_setting_is_checked() -> None:
    assert Settings(log_format="text").log_format == "text"
    with pytest.raises(ConfigError):
        Settings(log_format="xml")
    assert isinstance(logs.formatter("json"), logs.JsonFormatter)
    assert isinstance(logs.formatter("text"), logs.TextFormatter)


def test_access_log_format_has_no_query_string_or_referer() -> None:
    fmt = logs.ACCESS_LOG_FORMAT
    assert "%(U)s" in fmt  # the path alone
    for leaky in ("%(q)s", "%(r)s", "%(f)s", "%({"):
        assert leaky not in fmt


# --- Sentry ----------------------------------------------------------------------------


def test_scrubber_removes_bodies_numbers_and_credentials() -> None:
    event = {
        "level": "error",
        "message": "could not reach +44 7700 900123",
        "logentry": {"message": "send to %s failed", "params": ["+447700900123"]},
        "request": {
            "url": "https://api.example/batch?key=sk_live_secret",
            "query_string": "key=sk_live_secret",
            "data": {"message": "Your code is 4242", "destinations": ["447700900123"]},
            "headers": {"Authorization": "Bearer sk_live_secret", "User-Agent": "curl"},
        },
        "exception": {
            "values": [
                {
                    "type": "ProviderError",
                    "value": "rejected 447700900123",
                    "stacktrace": {"frames": [{"vars": {"body": "Your code is 4242", "n": 3}}]},
                }
            ]
        },
        "extra": {"to": "+447700900124", "batch_id": "b-1"},
        "breadcrumbs": {"values": [{"message": "POST to 447700900125", "data": {"text": "hi"}}]},
        "tags": {"queue": "send"},
    }
    clean = logs.scrub_event(event)
    flat = json.dumps(clean)
    for secret in ("900123", "900124", "900125", "4242", "sk_live_secret"):
        assert secret not in flat, secret
    assert clean["request"]["url"] == "https://api.example/batch"
    assert "data" not in clean["request"] and "query_string" not in clean["request"]
    assert clean["request"]["headers"]["Authorization"] == logs.FILTERED
    assert clean["request"]["headers"]["User-Agent"] == "curl"
    assert clean["extra"] == {"to": logs.FILTERED, "batch_id": "b-1"}
    assert clean["logentry"]["message"] == "send to %s failed"
    assert clean["tags"] == {"queue": "send"}
    assert clean["exception"]["values"][0]["type"] == "ProviderError"
    # The input is not changed (a pure function).
    assert event["extra"] == {"to": "+447700900124", "batch_id": "b-1"}


def test_scrubber_keeps_ordinary_numbers() -> None:
    assert logs.scrub("took 1234 ms, 3 retries") == "took 1234 ms, 3 retries"
    assert logs.scrub({"attempts": 5, "id": "7a1c8f56"}) == {"attempts": 5, "id": "7a1c8f56"}


def test_sentry_is_off_without_a_dsn() -> None:
    assert logs.init_sentry(Settings()) is False


def test_sentry_without_the_extra_is_reported_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    try:
        import sentry_sdk  # noqa: F401
    except ImportError:
        with caplog.at_level(logging.ERROR, logger="dispatcher.logs"):
            assert logs.init_sentry(Settings(sentry_dsn="https://k@o0.ingest.example/1")) is False
        assert "sentry-sdk is not installed" in caplog.text
    else:
        pytest.skip("sentry-sdk is installed here: nothing to report")


def test_api_requests_log_the_ids_in_their_url(runtime: object) -> None:
    from api.app import create_app
    from dispatcher.runtime import Runtime

    assert isinstance(runtime, Runtime)
    app = create_app(runtime.settings, runtime=runtime)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("dispatcher.test_logs.api")
    logger.addHandler(handler)
    logger.propagate = False

    @app.get("/test-logs/<batch_id>")
    def _view(batch_id: str) -> dict[str, str]:
        logger.warning("looking at it")
        return {"ok": batch_id}

    try:
        assert app.test_client().get("/test-logs/b-42").status_code == 200
        logger.warning("after the request")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    during, after = (json.loads(line) for line in stream.getvalue().splitlines())
    assert during["batch_id"] == "b-42"
    assert "batch_id" not in after
