"""Application metrics in one process: hooks, the token on /metrics, scrape-time backlog gauges."""

from __future__ import annotations

import http.server
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from dispatcher import backlog, metrics
from dispatcher.batches.models import Batch, Recipient
from dispatcher.config import Settings
from dispatcher.db import read_transaction, transaction, utcnow
from dispatcher.migrate import upgrade
from dispatcher.runtime import Runtime
from dispatcher.webhooks.models import Callback, Endpoint
from tests.deploy.system import sample
from tests.factories import Tenant
from tests.helpers import RecordingPublisher, make_settings

TOKEN = "s3cret-metrics-token"


def scrape() -> str:
    body, _ = metrics.exposition()
    return body.decode()


@pytest.mark.parametrize("amount", [0.0, 0.001, 0.003, 2.5, 29.9, 30.0, 45.0])
def test_observe_many_equals_that_many_observes(amount: float) -> None:
    def histogram() -> Histogram:
        return Histogram("h", "h", registry=CollectorRegistry(), buckets=(0.001, 2.5, 30.0))

    one_by_one, at_once = histogram(), histogram()
    for _ in range(7):
        one_by_one.observe(amount)
    metrics.observe_many(at_once, amount, 7)
    metrics.observe_many(at_once, amount, 0)

    def samples(h: Histogram) -> dict[tuple[str, str], float]:
        return {
            (s.name, s.labels.get("le", "")): s.value
            for m in h.collect()
            for s in m.samples
            if not s.name.endswith("_created")
        }

    got, want = samples(at_once), samples(one_by_one)
    # The sum is amount * 7 at once, not seven additions: equal up to rounding.
    assert got.pop(("h_sum", "")) == pytest.approx(want.pop(("h_sum", "")))
    assert got == want
    assert got[("h_count", "")] == 7


def test_status_changes_count_on_commit_and_not_on_rollback(
    sessions: sessionmaker[Session],
) -> None:
    batch = Batch(account_id="acct", send_at=utcnow() - timedelta(seconds=3))
    before = sample(scrape(), "dispatcher_recipients_total", status="queued", channel="rcs")
    with sessions() as session:
        metrics.status_changed(
            session=session, batch=batch, status="queued", changes=_changes(2), at=utcnow()
        )
        session.rollback()
    assert sample(scrape(), "dispatcher_recipients_total", status="queued", channel="rcs") == before
    lag_before = sample(scrape(), "dispatcher_send_lag_seconds_count", channel="rcs")
    sent_before = sample(scrape(), "dispatcher_recipients_total", status="sent", channel="rcs")
    with transaction(sessions) as session:
        metrics.status_changed(
            session=session, batch=batch, status="sent", changes=_changes(2), at=utcnow()
        )
        # Not yet committed: not yet counted.
        sent = sample(scrape(), "dispatcher_recipients_total", status="sent", channel="rcs")
        assert sent == sent_before
    text = scrape()
    assert sample(text, "dispatcher_recipients_total", status="sent", channel="rcs") == (
        sent_before + 2
    )
    assert sample(text, "dispatcher_send_lag_seconds_count", channel="rcs") == lag_before + 2
    # The lag (about 3 s) lands in the 5 s bucket, not the 2 s one.
    assert sample(text, "dispatcher_send_lag_seconds_bucket", channel="rcs", le="5.0") >= 2
    # No account label unless asked for (bounded cardinality).
    assert sample(text, "dispatcher_recipients_total", status="sent", account="acct") == 0
    assert sample(text, "dispatcher_recipients_total", status="sent", account="") >= 2


def _changes(n: int) -> list[object]:
    from dispatcher.batches.events import Change

    return [Change(recipient_id=f"r{i}", to="+447700900000", channel="rcs") for i in range(n)]


def test_per_account_label_only_behind_the_setting(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    batch = Batch(account_id="acct-per", send_at=utcnow())
    metrics.configure(settings.replace(metrics_per_account=True))
    try:
        with transaction(sessions) as session:
            metrics.status_changed(
                session=session, batch=batch, status="failed", changes=_changes(1), at=utcnow()
            )
    finally:
        metrics.configure(settings)
    assert sample(scrape(), "dispatcher_recipients_total", status="failed", account="acct-per") >= 1


def _app(settings: Settings, **changes: object) -> tuple[Runtime, object]:
    rt = Runtime(settings.replace(**changes), RecordingPublisher())
    return rt, create_app(rt.settings, runtime=rt).test_client()


def test_metrics_needs_the_bearer_token(settings: Settings) -> None:
    rt, client = _app(settings)
    try:
        assert client.get("/metrics").status_code == 404  # type: ignore[attr-defined]
    finally:
        rt.dispose()
    rt, client = _app(settings, metrics_token=TOKEN)
    try:
        assert client.get("/metrics").status_code == 401  # type: ignore[attr-defined]
        wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})  # type: ignore[attr-defined]
        assert wrong.status_code == 401
        assert client.get(f"/metrics?key={TOKEN}").status_code == 401  # type: ignore[attr-defined]
        ok = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})  # type: ignore[attr-defined]
        assert ok.status_code == 200
        assert ok.content_type.startswith("text/plain")
        assert "dispatcher_queue_depth" in ok.get_data(as_text=True)
    finally:
        rt.dispose()


@pytest.mark.parametrize("token", ["\xe9t\xe9", "caf\xe9 " + TOKEN])
def test_metrics_refuse_a_non_ascii_token_with_401(settings: Settings, token: str) -> None:
    # HTTP headers arrive as Latin-1: an unauthenticated scraper must get 401, never 500.
    rt, client = _app(settings, metrics_token=TOKEN)
    try:
        wrong = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})  # type: ignore[attr-defined]
    finally:
        rt.dispose()
    assert wrong.status_code == 401
    assert TOKEN not in wrong.get_data(as_text=True)


def test_requests_are_counted_by_url_rule_not_path(settings: Settings) -> None:
    rt, client = _app(settings, metrics_token=TOKEN)
    try:
        tenant = Tenant(rt.sessions)
        batch_id = "7a1c8f56-0000-4000-8000-000000000001"
        reply = client.get(f"/batch/{batch_id}", headers=tenant.auth)  # type: ignore[attr-defined]
        assert reply.status_code == 404
        # Unknown paths and made-up methods do not add label values either.
        client.open("/no/such/path/12345", method="BREW")  # type: ignore[attr-defined]
        text = client.get(  # type: ignore[attr-defined]
            "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
        ).get_data(as_text=True)
    finally:
        rt.dispose()
    assert batch_id not in text
    routes = {
        s.labels["route"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "dispatcher_http_requests_total"
    }
    assert any("<" in r and r.startswith("/batch/") for r in routes), routes
    # In label values, that is: a float in the text (a timestamp) may hold the digits.
    values = {
        v
        for f in text_string_to_metric_families(text)
        for s in f.samples
        for v in s.labels.values()
    }
    assert not any("12345" in v or "BREW" in v for v in values), values
    assert sample(text, "dispatcher_http_requests_total", route="unmatched", method="other") >= 1
    assert sample(text, "dispatcher_http_request_seconds_count", method="GET") >= 1


# --- scrape-time backlog -------------------------------------------------------------


@pytest.fixture()
def fresh(tmp_path: Path, redis_url: str) -> Runtime:
    """A runtime on an empty SQLite database and its own Redis db (nothing else's rows)."""
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    upgrade(Settings(database_url=url))
    settings = make_settings(
        database_url=url, redis_url=redis_url.rsplit("/", 1)[0] + "/7", var=tmp_path
    )
    rt = Runtime(settings, RecordingPublisher())
    rt.redis.flushdb()
    yield rt
    rt.redis.flushdb()
    rt.dispose()


def _snapshot(rt: Runtime, at: object) -> backlog.Snapshot:
    with read_transaction(rt.sessions) as session:
        return backlog.snapshot(session=session, now=at)  # type: ignore[arg-type]


def test_backlog_is_zero_when_nothing_is_due(fresh: Runtime) -> None:
    snap = _snapshot(fresh, utcnow())
    assert snap == backlog.Snapshot(0.0, 0.0, 0, 0, 0)


def test_oldest_due_recipient_and_callback_ages(fresh: Runtime) -> None:
    client = create_app(fresh.settings, runtime=fresh).test_client()
    tenant = Tenant(fresh.sessions)
    now = utcnow()
    later = (now + timedelta(hours=1)).isoformat() + "Z"
    body = {"from": "Dispatcher", "message": "hi", "destinations": ["447700900123"]}
    assert client.post("/batch", json=body, headers=tenant.auth).status_code == 200
    assert (
        client.post("/batch", json={**body, "send_at": later}, headers=tenant.auth).status_code
        == 200
    )
    # Sixty seconds on, nothing was sent (no worker): the due batch is 60 s late;
    # the one scheduled in an hour is not due and does not count.
    snap = _snapshot(fresh, now + timedelta(seconds=60))
    assert 59 <= snap.oldest_due_recipient_age <= 61
    assert 59 <= snap.oldest_undispatched_batch_age <= 61  # `dispatcher status`'s dispatch row
    assert snap.oldest_due_callback_age == 0.0

    with transaction(fresh.sessions) as session:
        session.execute(
            insert(Callback),
            [
                _callback(tenant.id, "pending", now - timedelta(seconds=30)),
                _callback(tenant.id, "pending", now + timedelta(seconds=300)),
                _callback(tenant.id, "dead", now - timedelta(days=1)),
                _callback(tenant.id, "held", now - timedelta(days=1)),
            ],
        )
        session.add(Endpoint(account_id=tenant.id, url="https://x.test/h", disabled_at=now))
    snap = _snapshot(fresh, now)
    assert 29 <= snap.oldest_due_callback_age <= 31
    assert (snap.dead_callbacks, snap.held_callbacks, snap.disabled_endpoints) == (1, 1, 1)

    # Once sending, the recipients still waiting for a first hand-off keep the age.
    with transaction(fresh.sessions) as session:
        # (its send_at is the POST's time, a moment after `now`)
        moved = session.execute(
            update(Batch)
            .where(Batch.send_at <= now + timedelta(seconds=1))
            .values(status="sending")
        )
        assert moved.rowcount == 1
        sending = select(Batch.id).where(Batch.status == "sending").scalar_subquery()
        session.execute(
            update(Recipient).where(Recipient.batch_id == sending).values(status="queued")
        )
    snap = _snapshot(fresh, now + timedelta(seconds=60))
    assert snap.oldest_due_recipient_age >= 59
    assert snap.oldest_undispatched_batch_age == 0.0  # dispatched: the send row's wait now


def _callback(account_id: str, state: str, next_at: object) -> dict[str, object]:
    return {
        "id": f"cb-{state}-{next_at}",
        "account_id": account_id,
        "event_type": "recipient_status",
        "url": "https://x.test/h",
        "payload": {},
        "state": state,
        "attempts": 0,
        "next_attempt_at": next_at,
        "created_at": utcnow(),
    }


def test_collector_reports_queue_depth_from_kombu_lists(fresh: Runtime) -> None:
    client: redis.Redis = fresh.redis
    client.rpush("send", "a", "b", "c")
    client.rpush("send\x06\x163", "d")
    client.rpush("callbacks", "e")
    collector = metrics.BacklogCollector(
        sessions=fresh.sessions, redis_client=client, cache_seconds=60
    )
    body, _ = metrics.exposition(collector)
    text = body.decode()
    assert sample(text, "dispatcher_queue_depth", queue="send") == 4
    assert sample(text, "dispatcher_queue_depth", queue="callbacks") == 1
    assert sample(text, "dispatcher_queue_depth", queue="dispatch") == 0
    assert sample(text, "dispatcher_backlog_scrape_ok") == 1
    # Cached: a change within cache_seconds is not seen by the next scrape.
    client.rpush("send", "f")
    assert (
        sample(metrics.exposition(collector)[0].decode(), "dispatcher_queue_depth", queue="send")
        == 4
    )


def test_collector_answers_while_the_database_is_down(tmp_path: Path, redis_url: str) -> None:
    settings = make_settings(
        database_url=f"sqlite:///{tmp_path / 'missing' / 'no.db'}",
        redis_url=redis_url,
        var=tmp_path,
    )
    rt = Runtime(settings, RecordingPublisher())
    try:
        collector = metrics.BacklogCollector(sessions=rt.sessions, redis_client=rt.redis)
        text = metrics.exposition(collector)[0].decode()
    finally:
        rt.dispose()
    assert sample(text, "dispatcher_backlog_scrape_ok") == 0
    assert "dispatcher_queue_depth" not in text


def test_token_check_is_exact() -> None:
    assert metrics.token_ok(expected="abc", authorization="Bearer abc")
    assert metrics.token_ok(expected="abc", authorization="bearer abc")
    assert not metrics.token_ok(expected="abc", authorization="Bearer abcd")
    assert not metrics.token_ok(expected="abc", authorization="Basic abc")
    assert not metrics.token_ok(expected="", authorization="Bearer ")
    assert not metrics.token_ok(expected="abc", authorization=None)


def test_carrier_connection_and_receipt_hooks() -> None:
    metrics.carrier_connection(provider="smpp", connection="smsc-1", up=False)
    before = sample(scrape(), "dispatcher_receipts_total", outcome="waiting")
    metrics.receipts("waiting", 3)
    metrics.receipts_applied(received=5, applied=4)
    text = scrape()
    assert sample(text, "dispatcher_carrier_connection_up", connection="smsc-1") == 0
    metrics.carrier_connection(provider="smpp", connection="smsc-1", up=True)
    assert sample(scrape(), "dispatcher_carrier_connection_up", connection="smsc-1") == 1
    assert sample(text, "dispatcher_receipts_total", outcome="waiting") == before + 3
    assert sample(text, "dispatcher_receipts_total", outcome="unmatched") >= 1


def test_dispatcher_run_empties_the_multiprocess_dir_and_keeps_one_token(tmp_path: Path) -> None:
    stale = tmp_path / "metrics"
    stale.mkdir()
    (stale / "counter_12345.db").write_bytes(b"old")
    env = metrics.multiproc_env(stale)
    assert env == {metrics.MULTIPROC_ENV: str(stale)}
    assert list(stale.iterdir()) == []
    token = metrics.dev_token(tmp_path)
    assert len(token) >= 24 and metrics.dev_token(tmp_path) == token
    assert (tmp_path / "metrics-token").stat().st_mode & 0o777 == 0o600


def test_dispatcher_run_logs_text_and_guards_metrics_unless_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dispatcher.devserver import prepare

    monkeypatch.delenv("DISPATCHER_LOG_FORMAT", raising=False)
    monkeypatch.delenv("DISPATCHER_CALLBACK_ALLOWLIST", raising=False)
    plain = prepare(Settings(var_dir=str(tmp_path)))
    assert plain.log_format == "text"
    assert plain.metrics_token == (tmp_path / "metrics-token").read_text().strip()
    loopback = Settings(callback_allowlist=("127.0.0.1", "::1", "localhost")).callback_allowlist
    assert plain.callback_allowlist == loopback
    monkeypatch.setenv("DISPATCHER_LOG_FORMAT", "json")
    monkeypatch.setenv("DISPATCHER_CALLBACK_ALLOWLIST", "")
    chosen = prepare(Settings(var_dir=str(tmp_path), metrics_token="mine"))
    assert (chosen.log_format, chosen.metrics_token) == ("json", "mine")
    assert chosen.callback_allowlist == ()


def test_dispatcher_run_with_an_external_redis_is_no_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployment keeps the loopback guard whole and its log format; /metrics stays guarded."""
    from dispatcher.devserver import prepare

    monkeypatch.delenv("DISPATCHER_LOG_FORMAT", raising=False)
    monkeypatch.delenv("DISPATCHER_CALLBACK_ALLOWLIST", raising=False)
    deployed = prepare(Settings(var_dir=str(tmp_path), embedded_redis=False))
    assert deployed.callback_allowlist == ()
    assert deployed.log_format == Settings().log_format == "json"
    assert deployed.metrics_token == (tmp_path / "metrics-token").read_text().strip()


class _Receiver(http.server.BaseHTTPRequestHandler):
    """Answers 204 on /ok and 500 on anything else."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(204 if self.path == "/ok" else 500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


def test_callback_outcomes_are_counted_by_a_real_delivery(fresh: Runtime) -> None:
    from dispatcher.webhooks import delivery

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    tenant = Tenant(fresh.sessions)
    ok, failing = (
        _callback(tenant.id, "pending", utcnow() - timedelta(seconds=1)) for _ in range(2)
    )
    ok.update(id="cb-ok", url=f"{base}/ok")
    failing.update(id="cb-fail", url=f"{base}/fail")
    with transaction(fresh.sessions) as session:
        session.execute(insert(Callback), [ok, failing])
    before = scrape()
    try:
        counts = delivery.deliver(
            factory=fresh.sessions,
            settings=fresh.settings,
            sender=fresh.webhook_sender,
            gate=delivery.gate_for(redis_client=fresh.redis, settings=fresh.settings),
            callback_ids=["cb-ok", "cb-fail"],
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert counts["delivered"] == 1 and counts["retry"] == 1
    after = scrape()
    for outcome in ("delivered", "retry"):
        assert sample(after, "dispatcher_callbacks_total", outcome=outcome) == (
            sample(before, "dispatcher_callbacks_total", outcome=outcome) + 1
        )
