"""Capacity from the CLI against a real worker: `dispatcher status`, `batches show` and `watch`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from flask.testing import FlaskClient
from sqlalchemy import select

from api.app import create_app
from dispatcher.batches.models import Batch, Recipient
from dispatcher.cli import main
from dispatcher.config import Settings
from dispatcher.db import utcnow
from dispatcher.engine.scheduling import promote_due
from dispatcher.migrate import upgrade
from dispatcher.outbox import Message, TaskName
from dispatcher.runtime import Runtime
from dispatcher.states import BatchStatus as B
from dispatcher.states import RecipientStatus as R
from tests.engine import system
from tests.factories import Tenant
from tests.helpers import RecordingPublisher, make_settings, wait_for

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def cli_settings(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    var = tmp_path_factory.mktemp("clivar")
    url = f"sqlite:///{var / 'cli.db'}"
    upgrade(Settings(database_url=url))
    # Its own Redis database: queue depths here are this module's only.
    return make_settings(database_url=url, redis_url=redis_url.rsplit("/", 1)[0] + "/4", var=var)


@pytest.fixture(scope="module")
def live(cli_settings: Settings) -> Iterator[Runtime]:
    with system.runtime(cli_settings) as rt:
        yield rt


@pytest.fixture(scope="module")
def worker(
    cli_settings: Settings, live: Runtime, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[system.Process]:
    with system.worker(cli_settings, tmp_path_factory.mktemp("clilogs"), name="clisend") as proc:
        yield proc


def run(settings: Settings, *args: str, ok: bool = True) -> Result:
    env = {k: v for k, v in settings.to_env().items()}
    result = CliRunner().invoke(main, list(args), env=env)
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


def api(rt: Runtime) -> FlaskClient:
    return create_app(rt.settings, runtime=rt).test_client()


def send(client: FlaskClient, tenant: Tenant, n: int, **extra: object) -> str:
    body = {
        "from": "Dispatcher",
        "message": "hi",
        "destinations": [f"4477005{i:05d}" for i in range(n)],
        **extra,
    }
    reply = client.post("/batch", json=body, headers=tenant.auth)
    assert reply.status_code == 200, reply.get_json()
    return str(reply.get_json()["identifier"])


def test_status_shows_queues_workers_throughput_and_backlog(
    cli_settings: Settings, live: Runtime, worker: system.Process
) -> None:
    tenant = Tenant(live.sessions)
    batch_id = send(api(live), tenant, 5)
    wait_for(
        lambda: "is final" in run(cli_settings, "batches", "watch", batch_id).output, timeout=60
    )
    # A due batch nobody was told about (no publish, no beat): a backlog of 3.
    stuck = Runtime(cli_settings, RecordingPublisher())
    try:
        late = Tenant(stuck.sessions, name="late")
        send(api(stuck), late, 3)
    finally:
        stuck.dispose()

    def answered() -> str | None:
        out = run(cli_settings, "status", "--timeout", "2").output
        return out if "clisend" in out else None

    out = wait_for(answered, timeout=30, interval=0.5)
    # Every node with a heartbeat answered: status does not sit out its --timeout.
    started = time.monotonic()
    assert "clisend" in run(cli_settings, "status", "--timeout", "30").output
    assert time.monotonic() - started < 15
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert "clisend" in rows["send"] and "clisend" in rows["dispatch"]
    assert "(none answered)" in rows["callbacks"]
    # Five sends within the minute: 5/60 per second.
    assert "0.1 sends/s" in out
    assert f"{late.id}  3" in out
    assert f"{tenant.id}" not in out.split("largest backlogs")[1]


def test_status_names_the_providers_and_what_waits_for_a_retry(
    cli_settings: Settings, live: Runtime
) -> None:
    stuck = Runtime(cli_settings, RecordingPublisher())
    try:
        tenant = Tenant(stuck.sessions, name="refused")
        batch_id = send(api(stuck), tenant, 4)
        # What record_results leaves after Twilio refused our credentials (3 of them)
        # and an RBM token refusal (1): queued again, the code kept, a retry booked.
        soon = utcnow() + timedelta(seconds=120)
        with stuck.sessions.begin() as session:
            rows = session.scalars(
                select(Recipient).where(Recipient.batch_id == batch_id).order_by(Recipient.seq)
            ).all()
            for row, code in zip(rows, ["twilio_20003"] * 3 + ["rbm_auth"], strict=True):
                row.status, row.error_code, row.next_attempt_at = R.QUEUED, code, soon
    finally:
        stuck.dispose()
    out = run(cli_settings, "status", "--timeout", "0.5").output
    # Before, nothing in `dispatcher status` said which carrier or why messages waited.
    assert "providers: sms simulator, rcs simulator, whatsapp simulator" in out
    waiting = out.split("waiting for a retry after a failed hand-off")[1].splitlines()[1:3]
    assert waiting[0].split() == ["sms", "twilio_20003", "3", "in", waiting[0].split()[-1]]
    assert waiting[1].split()[:3] == ["sms", "rbm_auth", "1"]
    assert 110 <= int(waiting[0].split()[-1].removesuffix("s")) <= 120


def test_retry_now_brings_failed_hand_offs_forward_for_the_sweep(
    cli_settings: Settings, live: Runtime
) -> None:
    publisher = RecordingPublisher()
    stuck = Runtime(cli_settings, publisher)
    try:
        tenant = Tenant(stuck.sessions, name="fixed")
        batch_id = send(api(stuck), tenant, 5)
        # Twilio refused our credentials for 3 (an hour to their next retry), one waits
        # for its rate slot (no code), one failed on another channel's code.
        later = utcnow() + timedelta(hours=1)
        with stuck.sessions.begin() as session:
            session.get_one(Batch, batch_id).status = B.SENDING
            rows = session.scalars(
                select(Recipient).where(Recipient.batch_id == batch_id).order_by(Recipient.seq)
            ).all()
            for row, code in zip(rows, ["twilio_20003"] * 3 + [None, "rbm_auth"], strict=True):
                row.status, row.error_code, row.next_attempt_at = R.QUEUED, code, later
        out = run(cli_settings, "retry-now", "--code", "twilio_20003").output
        assert out.startswith("3 recipient(s) will be handed over again within seconds")
        # The scheduler's next sweep publishes them (before: in an hour).
        publisher.messages.clear()
        with stuck.sessions.begin() as session:
            promote_due(session=session, settings=cli_settings, now=utcnow())
        ids = {r.id for r in rows[:3]}
        sends = [
            set(m.kwargs["recipient_ids"])
            for m in publisher.messages
            if isinstance(m, Message)
            and m.task == TaskName.SEND_RECIPIENTS
            and m.kwargs["batch_id"] == batch_id
        ]
        assert sends == [ids]
        with stuck.sessions() as session:
            due = session.scalars(
                select(Recipient.id).where(
                    Recipient.batch_id == batch_id, Recipient.next_attempt_at <= utcnow()
                )
            ).all()
            kept = session.scalars(
                select(Recipient.next_attempt_at).where(
                    Recipient.batch_id == batch_id, Recipient.id.not_in(ids)
                )
            ).all()
        assert set(due) == ids
        assert kept == [later, later]
    finally:
        stuck.dispose()


def test_batches_show_counts_by_status(cli_settings: Settings, live: Runtime) -> None:
    stuck = Runtime(cli_settings, RecordingPublisher())
    try:
        tenant = Tenant(stuck.sessions)
        later = (utcnow() + timedelta(hours=2)).isoformat() + "Z"
        batch_id = send(api(stuck), tenant, 4, send_at=later)
    finally:
        stuck.dispose()
    out = run(cli_settings, "batches", "show", batch_id).output
    assert f"batch {batch_id}  account {tenant.id}" in out
    assert "status scheduled" in out and "recipients 4" in out
    assert "scheduled  4" in out
    assert "[" + "." * 30 + "]" in out
    # Still scheduled when the watch gives up: exit 1, saying so.
    result = run(
        cli_settings, "batches", "watch", batch_id, "--timeout", "1", "--interval", "0.2", ok=False
    )
    assert result.exit_code == 1
    assert "still scheduled after 1s" in result.output


def test_watch_follows_a_batch_until_final(
    cli_settings: Settings, live: Runtime, worker: system.Process
) -> None:
    tenant = Tenant(live.sessions)
    batch_id = send(api(live), tenant, 20)
    result = run(cli_settings, "batches", "watch", batch_id, "--interval", "0.2", "--timeout", "60")
    lines = result.output.splitlines()
    assert lines[-1].startswith(f"batch {batch_id} is final: completed")
    assert "100.0%" in lines[-2]
    assert "sent=" in lines[-2] or "delivered=" in lines[-2]


def test_unknown_batch_is_refused(cli_settings: Settings, tmp_path: Path) -> None:
    result = run(cli_settings, "batches", "show", "no-such-batch", ok=False)
    assert result.exit_code == 1
    assert "batch no-such-batch not found" in result.output
