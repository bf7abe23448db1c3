"""Run the vendor stand-ins for a local trial: ``python -m tests.standins``.

Starts Google RBM (with its token endpoint), the WhatsApp Cloud API and Twilio's
Messages API on 127.0.0.1, writes the ``DISPATCHER_*`` settings that point
Dispatcher at them (a shell file to ``source``, with a service-account key file
beside it), and posts each accepted message's status webhooks back to the API,
signed as each vendor signs them. Some numbers answer as the vendors do when
something goes wrong (see ``FAILING``). Runs until Ctrl-C or ``--lifetime``.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.standins import Reply, Request, rbm, twilio, whatsapp

AGENT = "dispatcher-agent@rbm.goog"
CLIENT_TOKEN = "local-rbm-client-token"
APP_SECRET = "local-whatsapp-app-secret"
VERIFY_TOKEN = "local-whatsapp-verify-token"
NUMBER_ID = "106540352242922"
WA_TOKEN = "local-whatsapp-token"
SID = "AC" + "0" * 32
# Never set: waits on it are pauses that a signal (Ctrl-C) still interrupts.
_STOP = threading.Event()
AUTH_TOKEN = "local-twilio-auth-token"
# Numbers (E.164) that meet the vendors' usual refusals, what each shows.
FAILING = {
    "+447700900200": "RBM: not RCS-capable (404 NOT_FOUND at send: falls back)",
    "+447700900201": "WhatsApp: 131026 undeliverable at send (falls back)",
    "+447700900202": "Twilio: 21614 not a mobile number (the recipient fails)",
    "+447700900203": "WhatsApp: accepted, then a failed status 131026 (late fallback)",
    "+447700900204": "RBM: accepted, then TTL_EXPIRATION_REVOKED (late fallback)",
}


def _later(post: Callable[[], requests.Response], delay: float) -> None:
    """POST a status webhook ``delay`` seconds from now, printing Dispatcher's answer."""

    def run() -> None:
        _STOP.wait(delay)
        try:
            reply = post()
            print(f"  webhook -> {reply.status_code} {reply.text.strip()[:120]}", flush=True)
        except requests.RequestException as exc:
            print(f"  webhook failed: {type(exc).__name__}", flush=True)

    threading.Thread(target=run, daemon=True).start()


def _rbm_events(api: str, delay: float) -> Callable[[Request, Reply], None]:
    hook = f"{api}/providers/rbm/events"

    def accepted(request: Request, reply: Reply) -> None:
        ref, number = request.query["messageId"][0], request.path.split("/")[3]
        print(f"rbm accepted {number} {ref}", flush=True)
        kinds = ["TTL_EXPIRATION_REVOKED"] if number == "+447700900204" else ["DELIVERED", "READ"]
        for i, kind in enumerate(kinds):
            event = rbm.event(kind, ref, number)
            push = functools.partial(rbm.push, hook, event, client_token=CLIENT_TOKEN)
            _later(push, delay * (i + 1))

    return accepted


def _whatsapp_statuses(api: str, delay: float) -> Callable[[Request, Reply], None]:
    hook = f"{api}/providers/whatsapp/webhook"

    def accepted(request: Request, reply: Reply) -> None:
        ref, to = reply.body["messages"][0]["id"], request.json()["to"]
        print(f"whatsapp accepted +{to} {ref}", flush=True)
        failed = to == "447700900203"
        item = whatsapp.status(ref, "failed", code=131026) if failed else None
        item = item or whatsapp.status(ref, "delivered")
        _later(lambda: whatsapp.notify(hook, [item], app_secret=APP_SECRET), delay)

    return accepted


def _twilio_callbacks(delay: float) -> Callable[[Request, Reply], None]:
    def accepted(request: Request, reply: Reply) -> None:
        form = {k: v[0] for k, v in request.form().items()}
        sid, hook = reply.body["sid"], form.get("StatusCallback")
        print(f"twilio accepted {form.get('To')} {sid}", flush=True)
        if hook:
            params = twilio.status_params(sid, "delivered", account_sid=SID)
            _later(lambda: twilio.callback(hook, params, auth_token=AUTH_TOKEN), delay)

    return accepted


def settings(
    *, api: str, key_file: Path, rbm_url: str, whatsapp_url: str, twilio_url: str
) -> dict[str, str]:
    """The DISPATCHER_* variables that point every rich channel and SMS at the stand-ins."""
    return {
        "DISPATCHER_CHANNEL_PROVIDERS": json.dumps(
            {"rcs": "rbm", "whatsapp": "whatsapp_cloud", "sms": "twilio"}
        ),
        "DISPATCHER_PUBLIC_BASE_URL": api,
        "DISPATCHER_RBM_AGENT_ID": AGENT,
        "DISPATCHER_RBM_SERVICE_ACCOUNT_FILE": str(key_file),
        "DISPATCHER_RBM_CLIENT_TOKEN": CLIENT_TOKEN,
        "DISPATCHER_RBM_API_URL": rbm_url,
        "DISPATCHER_WHATSAPP_PHONE_NUMBER_ID": NUMBER_ID,
        "DISPATCHER_WHATSAPP_TOKENS": json.dumps({NUMBER_ID: WA_TOKEN}),
        "DISPATCHER_WHATSAPP_APP_SECRET": APP_SECRET,
        "DISPATCHER_WHATSAPP_VERIFY_TOKEN": VERIFY_TOKEN,
        "DISPATCHER_WHATSAPP_API_URL": whatsapp_url,
        "DISPATCHER_TWILIO_ACCOUNT_SID": SID,
        "DISPATCHER_TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "DISPATCHER_TWILIO_API_URL": twilio_url,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.standins", description=__doc__)
    parser.add_argument("--api", default="http://127.0.0.1:8000", help="Dispatcher's API URL")
    parser.add_argument("--dir", type=Path, default=Path("var/standins"), help="files go here")
    parser.add_argument("--rbm-port", type=int, default=8101)
    parser.add_argument("--whatsapp-port", type=int, default=8102)
    parser.add_argument("--twilio-port", type=int, default=8103)
    parser.add_argument("--delay", type=float, default=1.0, help="seconds before each status")
    parser.add_argument("--lifetime", type=float, default=3600.0, help="seconds, then exit")
    args = parser.parse_args(argv)
    api = args.api.rstrip("/")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    google = rbm.Rbm(public_key=key.public_key(), port=args.rbm_port)
    meta = whatsapp.WhatsApp(tokens={NUMBER_ID: WA_TOKEN}, port=args.whatsapp_port)
    twl = twilio.Twilio(account_sid=SID, auth_token=AUTH_TOKEN, port=args.twilio_port)
    google.not_capable.add("+447700900200")
    meta.errors["447700900201"] = 131026
    twl.errors["+447700900202"] = twilio.error(400, 21614, "To number is not a mobile number")
    google.before_reply = _rbm_events(api, args.delay)
    meta.before_reply = _whatsapp_statuses(api, args.delay)
    twl.before_reply = _twilio_callbacks(args.delay)
    args.dir.mkdir(parents=True, exist_ok=True)
    key_file = (args.dir / "rbm-service-account.json").resolve()
    rbm.write_key_file(key_file, key, google.token_uri)
    env = settings(
        api=api,
        key_file=key_file,
        rbm_url=google.url,
        whatsapp_url=meta.api_url,
        twilio_url=twl.url,
    )
    env_file = args.dir / "carriers.env"
    env_file.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    stand_ins: list[Any] = [google, meta, twl]
    for stand_in in stand_ins:
        stand_in.__enter__()
    print(f"RBM {google.url}, WhatsApp {meta.api_url}, Twilio {twl.url}")
    print(f"settings: source {env_file}")
    for number, what in FAILING.items():
        print(f"  {number}  {what}")
    try:
        _STOP.wait(args.lifetime)
    except KeyboardInterrupt:
        pass
    finally:
        for stand_in in stand_ins:
            stand_in.__exit__()


if __name__ == "__main__":
    main()
