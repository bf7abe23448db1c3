"""SMPP in the throughput bench: ``python -m bench.throughput --provider smpp``.

One invocation runs throughput mode twice on the same machine: first with the
simulator, then with the ``smpp`` provider through the local SMSC (smpp34's
server, ``dispatcher smsc``) and the connector (``dispatcher smpp-connector``),
each a child of the bench's private system. It prints both runs' figures, then
``smpp_vs_simulator`` (the ratio of their end-to-end recipients/s; goal >= 0.8)
and ``smpp_connections`` (binds, submits, window peak and mean outstanding).

    make bench-smpp                                          # 20,000 recipients each
    python -m bench.throughput --provider smpp --recipients 2000 --smpp-binds 2
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import redis

from bench.harness import BenchError, Out, System, free_port, log

CARRIER = "local"
DEFAULT_RECIPIENTS = 20_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The throughput CLI's SMPP options."""
    p.add_argument(
        "--provider",
        choices=("simulator", "smpp"),
        default="simulator",
        help="smpp: run the simulator, then the local SMSC through the connector, and print"
        " the ratio of their end-to-end rates (recipients: 20000 unless given)",
    )
    p.add_argument("--smpp-binds", type=int, default=1, help="smpp: connections (one bind each)")
    p.add_argument("--smpp-window", type=int, default=50, help="smpp: outstanding submits/bind")


def connection(i: int) -> str:
    return f"{CARRIER}-{i}"


def overrides(system: System) -> dict[str, Any]:
    """Settings of an smpp run (the SMSC's port chosen now); nothing for the simulator."""
    args = system.args
    if getattr(args, "provider", "simulator") != "smpp":
        return {}
    port = free_port()
    conns = [
        {
            "name": connection(i),
            "host": "127.0.0.1",
            "port": port,
            "system_id": f"bench{i}",
            "password": "bench",
            "window": args.smpp_window,
        }
        for i in range(args.smpp_binds)
    ]
    return {"provider": "smpp", "smpp": {"carriers": {CARRIER: {"connections": conns}}}}


def start(system: System) -> None:
    """The local SMSC and the connector, once every connection is bound (smpp runs only)."""
    args = system.args
    if getattr(args, "provider", "simulator") != "smpp":
        return
    assert system.settings is not None
    port = system.settings.smpp["carriers"][CARRIER]["connections"][0]["port"]
    cli = [sys.executable, "-c", "from dispatcher.cli import main; main()"]
    smsc = [*cli, "smsc", "--port", str(port), "--no-reply"]
    system.start("smsc", [*smsc, "--receipt-delay", str(args.receipt_delay)], role="smsc")
    argv = [*cli, "smpp-connector"]
    if args.py_spy:
        out = system.tmp / "py-spy-connector.txt"
        argv = [args.py_spy, "record", "--idle", "--rate", "50", "--format", "raw"]
        argv += ["--output", str(out), "--", *cli, "smpp-connector"]
        log(f"py-spy profile of the connector -> {out}")
    system.start("connector", argv, role="connector", wrapped=bool(args.py_spy))
    client = redis.Redis.from_url(system.redis_url)
    keys = [f"dispatcher:smpp:alive:{connection(i)}" for i in range(args.smpp_binds)]
    deadline = time.monotonic() + 60
    try:
        while not all(client.exists(k) for k in keys):
            system.check_alive()
            if time.monotonic() > deadline:
                raise BenchError("the connector did not bind within 60 s")
            time.sleep(0.1)
    finally:
        client.close()


def report(system: System, out: Out) -> None:
    """Binds and window use, from the connector's counters (smpp runs only)."""
    args = system.args
    if getattr(args, "provider", "simulator") != "smpp":
        return
    # The connector writes its counters every second.
    time.sleep(1.5)
    client = redis.Redis.from_url(system.redis_url, decode_responses=True)
    try:
        per = {
            connection(i): {
                str(k): int(v)
                for k, v in client.hgetall(f"dispatcher:smpp:stats:{connection(i)}").items()
            }
            for i in range(args.smpp_binds)
        }
    finally:
        client.close()
    submits = sum(s.get("submits", 0) for s in per.values())
    outstanding = sum(s.get("outstanding_sum", 0) for s in per.values())
    out.emit(
        "smpp_connections",
        binds=sum(s.get("binds_up", 0) for s in per.values()),
        window=args.smpp_window,
        submits=submits,
        window_max=max((s.get("window_peak", 0) for s in per.values()), default=0),
        window_mean=round(outstanding / submits, 2) if submits else None,
        throttled=sum(s.get("throttled", 0) for s in per.values()),
        unknown=sum(s.get("unknown", 0) for s in per.values()),
        receipts=sum(s.get("receipts", 0) for s in per.values()),
        per_connection=per,
        what="window_mean: submits outstanding on the bind as each submit_sm went out",
    )


def compare(args: argparse.Namespace, run_once: Callable[[argparse.Namespace], int]) -> int:
    """The simulator, then SMPP, in one invocation; then the ratio of their rates."""
    rates: dict[str, float] = {}
    for provider in ("simulator", "smpp"):
        one = argparse.Namespace(**{**vars(args), "provider": provider, "collect": {}})
        code = run_once(one)
        if code:
            return code
        rates[provider] = one.collect["e2e"]
    ratio = rates["smpp"] / rates["simulator"]
    Out(args, {k: v for k, v in vars(args).items() if k not in ("collect", "keep")}).emit(
        "smpp_vs_simulator",
        value=round(ratio, 3),
        smpp_recipients_per_s=rates["smpp"],
        simulator_recipients_per_s=rates["simulator"],
        goal=0.8,
        what="end_to_end_recipients_per_s over the local SMSC / the simulator's, same machine",
    )
    log(f"smpp {rates['smpp']}/s vs simulator {rates['simulator']}/s: ratio {ratio:.2f}")
    return 0


# -- the connector alone: `python -m bench.smpp` ------------------------------------


def connector_alone(args: argparse.Namespace) -> int:
    """The local SMSC and the connector as children, fed by SmppProvider from threads
    (no API, no Celery): CPU per message of the connector and the SMSC, for A/B runs."""
    import concurrent.futures
    import uuid

    from bench.harness import Out
    from bench.sampler import ProcSampler
    from dispatcher.channels.base import OutboundMessage, Outcome
    from dispatcher.channels.smpp.provider import SmppProvider

    args.provider, args.mode = "smpp", "smpp-connector"
    system = System(args)
    failed = True
    try:
        system.start_redis()
        system.configure(**overrides(system))
        system.migrate_and_account(rate=None)
        start(system)
        assert system.settings is not None
        config = system.settings.smpp_config()
        sampler = ProcSampler(system.sampled)
        sampler.start()
        n, group = args.recipients, 200
        started = time.monotonic()

        def send(first: int) -> int:
            client = redis.Redis.from_url(system.redis_url, socket_timeout=10)
            provider = SmppProvider(redis_client=client, config=config)
            messages = [
                OutboundMessage(
                    recipient_id=uuid.uuid4().hex,
                    channel="sms",
                    to=f"+4670{first + i:07d}",
                    sender="Bench",
                    body=f"Bench message {first + i}: the quick brown fox",
                )
                for i in range(min(group, n - first))
            ]
            results = provider.send_many(messages)
            client.close()
            return sum(r.outcome is Outcome.ACCEPTED for r in results)

        with concurrent.futures.ThreadPoolExecutor(args.senders) as pool:
            accepted = sum(pool.map(send, range(0, n, group)))
        sent_s = time.monotonic() - started
        client = redis.Redis.from_url(system.redis_url, decode_responses=True)
        deadline = time.monotonic() + 120
        while True:
            stats = client.hgetall(f"dispatcher:smpp:stats:{connection(0)}")
            if int(stats.get("receipts", 0)) >= accepted or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        # Receipts are flushed to the database once a second.
        time.sleep(2.5)
        sampler.finish()
        cpu = sampler.cpu_by_role()
        Out(args, {"recipients": n, "window": args.smpp_window}).emit(
            "smpp_connector_cpu",
            messages=n,
            accepted=accepted,
            receipts=int(stats.get("receipts", 0)),
            send_s=round(sent_s, 2),
            messages_per_s=round(n / sent_s, 1),
            connector_ms=round(1000 * cpu.get("connector", 0.0) / n, 3),
            smsc_ms=round(1000 * cpu.get("smsc", 0.0) / n, 3),
            window=args.smpp_window,
            window_mean=round(int(stats.get("outstanding_sum", 0)) / max(accepted, 1), 2),
            what="process CPU ms per message (connector: submit, receipt read and queued)",
        )
        failed = False
    finally:
        system.stop()
        system.cleanup(failed)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=connector_alone.__doc__)
    add_arguments(p)
    p.add_argument("--recipients", type=int, default=10_000)
    p.add_argument("--senders", type=int, default=4, help="threads handing off (as workers)")
    p.add_argument("--receipt-delay", type=float, default=0.5)
    p.add_argument("--py-spy", default=None)
    p.add_argument("--database", default="sqlite")
    p.add_argument("--chunk-size", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--keep", action="store_true")
    return connector_alone(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
