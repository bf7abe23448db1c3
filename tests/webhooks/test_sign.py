"""Tests for Standard Webhooks signing and verification."""

from __future__ import annotations

import base64

import pytest

from dispatcher.webhooks import sign
from dispatcher.webhooks.sign import InvalidSignature

SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_spec_vector() -> None:
    assert (
        sign.sign(secrets=[SPEC_SECRET], msg_id=SPEC_ID, timestamp=SPEC_TS, body=SPEC_BODY)
        == SPEC_SIG
    )


def test_spec_vector_verifies() -> None:
    hdrs = {"webhook-id": SPEC_ID, "webhook-timestamp": str(SPEC_TS), "webhook-signature": SPEC_SIG}
    sign.verify(secret=SPEC_SECRET, headers=hdrs, body=SPEC_BODY, now=SPEC_TS)


def test_headers() -> None:
    hdrs = sign.headers(secrets=[SPEC_SECRET], msg_id=SPEC_ID, timestamp=SPEC_TS, body=SPEC_BODY)
    assert hdrs == {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(SPEC_TS),
        "webhook-signature": SPEC_SIG,
    }


def test_verify_header_names_case_insensitive() -> None:
    hdrs = {"Webhook-Id": SPEC_ID, "WEBHOOK-TIMESTAMP": str(SPEC_TS), "Webhook-Signature": SPEC_SIG}
    sign.verify(secret=SPEC_SECRET, headers=hdrs, body=SPEC_BODY, now=SPEC_TS)


def test_new_secret_format() -> None:
    secret = sign.new_secret()
    assert secret.startswith("whsec_")
    key = base64.b64decode(secret[len("whsec_") :], validate=True)
    assert 24 <= len(key) <= 32
    assert sign.new_secret() != secret


def test_rotation_two_secrets_two_signatures() -> None:
    old, new = sign.new_secret(), sign.new_secret()
    hdrs = sign.headers(secrets=[old, new], msg_id="msg_1", timestamp=1000, body=b"{}")
    entries = hdrs["webhook-signature"].split(" ")
    assert len(entries) == 2 and all(e.startswith("v1,") for e in entries)
    for secret in (old, new):
        sign.verify(secret=secret, headers=hdrs, body=b"{}", now=1000)
    with pytest.raises(InvalidSignature):
        sign.verify(secret=sign.new_secret(), headers=hdrs, body=b"{}", now=1000)


def test_verify_ignores_unknown_versions() -> None:
    hdrs = {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(SPEC_TS),
        "webhook-signature": f"v2,abc v1a,xyz {SPEC_SIG}",
    }
    sign.verify(secret=SPEC_SECRET, headers=hdrs, body=SPEC_BODY, now=SPEC_TS)


def _spec_headers(**override: str) -> dict[str, str]:
    hdrs = {"webhook-id": SPEC_ID, "webhook-timestamp": str(SPEC_TS), "webhook-signature": SPEC_SIG}
    hdrs.update(override)
    return hdrs


def test_tampered_body_fails() -> None:
    with pytest.raises(InvalidSignature):
        sign.verify(
            secret=SPEC_SECRET, headers=_spec_headers(), body=b'{"test": 2432232315}', now=SPEC_TS
        )


def test_tampered_timestamp_fails() -> None:
    hdrs = _spec_headers(**{"webhook-timestamp": str(SPEC_TS + 1)})
    with pytest.raises(InvalidSignature):
        sign.verify(secret=SPEC_SECRET, headers=hdrs, body=SPEC_BODY, now=SPEC_TS)


def test_tampered_id_fails() -> None:
    with pytest.raises(InvalidSignature):
        sign.verify(
            secret=SPEC_SECRET,
            headers=_spec_headers(**{"webhook-id": "msg_other"}),
            body=SPEC_BODY,
            now=SPEC_TS,
        )


@pytest.mark.parametrize("now", [SPEC_TS + 301, SPEC_TS - 301])
def test_stale_or_future_timestamp_fails(now: int) -> None:
    with pytest.raises(InvalidSignature, match="timestamp"):
        sign.verify(secret=SPEC_SECRET, headers=_spec_headers(), body=SPEC_BODY, now=now)


@pytest.mark.parametrize("now", [SPEC_TS + 300, SPEC_TS - 300])
def test_timestamp_within_tolerance(now: int) -> None:
    sign.verify(secret=SPEC_SECRET, headers=_spec_headers(), body=SPEC_BODY, now=now)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header_fails(missing: str) -> None:
    hdrs = _spec_headers()
    del hdrs[missing]
    with pytest.raises(InvalidSignature, match=missing):
        sign.verify(secret=SPEC_SECRET, headers=hdrs, body=SPEC_BODY, now=SPEC_TS)


@pytest.mark.parametrize("ts", ["abc", "-1", "1.5", ""])
def test_garbage_timestamp_fails(ts: str) -> None:
    with pytest.raises(InvalidSignature):
        sign.verify(
            secret=SPEC_SECRET,
            headers=_spec_headers(**{"webhook-timestamp": ts}),
            body=SPEC_BODY,
            now=SPEC_TS,
        )


@pytest.mark.parametrize(
    "sig", ["", "v1,", "v1,not-base64!!", "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=", "v1,é"]
)
def test_garbage_signature_fails(sig: str) -> None:
    with pytest.raises(InvalidSignature):
        sign.verify(
            secret=SPEC_SECRET,
            headers=_spec_headers(**{"webhook-signature": sig}),
            body=SPEC_BODY,
            now=SPEC_TS,
        )


@pytest.mark.parametrize("secret", ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_", "whsec_***"])
def test_bad_secret_rejected(secret: str) -> None:
    with pytest.raises(ValueError):
        sign.sign(secrets=[secret], msg_id="m", timestamp=1, body=b"")


def test_sign_requires_secrets() -> None:
    with pytest.raises(ValueError):
        sign.sign(secrets=[], msg_id="m", timestamp=1, body=b"")
    with pytest.raises(TypeError):
        sign.sign(secrets=SPEC_SECRET, msg_id="m", timestamp=1, body=b"")
