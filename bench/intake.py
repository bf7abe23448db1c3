"""The client side of a run: batches POSTed to the API, and a sink for callbacks."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import requests

from bench.harness import BenchError, System, free_port
from bench.sampler import ProcSampler


def numbers(batch_index: int, size: int) -> list[str]:
    """Distinct possible UK mobile numbers, unique across the run."""
    base = batch_index * size
    return [f"+447{base + i:09d}" for i in range(size)]


class Intake:
    """POSTs batches to the API from a few client threads; records what was accepted."""

    def __init__(
        self,
        system: System,
        *,
        batches: list[int],
        threads: int,
        send_at: str | None = None,
        first_batch: int = 0,
    ) -> None:
        self.system = system
        self.batches = batches
        self.threads = threads
        # ISO 8601 send time for every batch (None: send now).
        self.send_at = send_at
        # Batch numbers (and so phone numbers) start here: several intakes in one run differ.
        self.first_batch = first_batch
        self.lock = threading.Lock()
        self.next = 0
        self.accepted = 0
        self.batch_ids: list[str] = []
        self.errors: list[str] = []
        self.request_seconds: list[float] = []
        self.started = 0.0
        self.finished = 0.0
        self.started_wall = 0.0
        self.bodies: list[bytes] = []
        # The sampler's figures over the intake alone (CPU by role, the machine's noise).
        self.usage: dict[str, Any] = {}

    def cpu(self) -> dict[str, Any]:
        """CPU during the intake: the API's per recipient (the figure that holds under
        load), by role, and what the rest of the machine used (``foreign_cpu_pct``)."""
        by_role = self.usage.get("cpu_s_by_role", {})
        per = 1e6 / max(self.accepted, 1)
        return {
            "api_cpu_us_per_recipient": round(by_role.get("api", 0.0) * per, 1),
            "client_cpu_us_per_recipient": round(by_role.get("bench", 0.0) * per, 1),
            "cpu_s_by_role": by_role,
            "machine_busy_pct": self.usage.get("machine_busy_pct"),
            "foreign_cpu_pct": self.usage.get("foreign_cpu_pct"),
        }

    def _take(self) -> tuple[int, int] | None:
        with self.lock:
            if self.next >= len(self.batches) or self.errors:
                return None
            index = self.next
            self.next += 1
            return index, self.batches[index]

    def _body(self, index: int, size: int) -> bytes:
        body: dict[str, Any] = {
            "from": "Dispatcher",
            "message": "Benchmark message",
            "destinations": numbers(self.first_batch + index, self.system.args.batch_size)[:size],
        }
        if self.send_at:
            body["send_at"] = self.send_at
        if self.system.callback_url:
            body["callback"] = self.system.callback_url
        return json.dumps(body).encode()

    def _run(self) -> None:
        # One kept-alive session per thread; bodies were serialised before the clock started.
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.system.api_key}"
        session.headers["Content-Type"] = "application/json"
        url = self.system.api_base + "/batch?allowMulti=true"
        while (item := self._take()) is not None:
            index, size = item
            t0 = time.monotonic()
            try:
                reply = session.post(url, data=self.bodies[index], timeout=120)
            except requests.RequestException as exc:
                with self.lock:
                    self.errors.append(f"batch {index}: {exc}")
                return
            elapsed = time.monotonic() - t0
            with self.lock:
                if reply.status_code != 200:
                    self.errors.append(f"batch {index}: {reply.status_code} {reply.text[:300]}")
                    return
                self.accepted += size
                self.batch_ids.append(reply.json()["identifier"])
                self.request_seconds.append(elapsed)
        session.close()

    def run(self) -> None:
        # The client's own work stays out of the figure: what is timed is the API.
        self.bodies = [self._body(i, size) for i, size in enumerate(self.batches)]
        sampler = ProcSampler(self.system.sampled)
        sampler.start()
        self.started_wall = time.time()
        self.started = time.monotonic()
        pool = [
            threading.Thread(target=self._run, name=f"intake-{i}", daemon=True)
            for i in range(self.threads)
        ]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        self.finished = time.monotonic()
        sampler.finish()
        self.usage = sampler.result(self.accepted)
        if self.errors:
            raise BenchError("intake failed: " + "; ".join(self.errors[:3]))


def batch_sizes(total: int, size: int) -> list[int]:
    full, rest = divmod(total, size)
    return [size] * full + ([rest] if rest else [])


class CallbackSink:
    """The callback receiver (bench/sink.py) in a process of its own, and its figures."""

    def __init__(self, system: System) -> None:
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.url = f"{self.base}/callback"
        self.child = system.start(
            "sink", [sys.executable, "-m", "bench.sink", "--port", str(port)], role="sink"
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.stats()
                return
            except requests.RequestException:
                system.check_alive()
                if time.monotonic() > deadline:
                    raise BenchError("the callback sink did not answer within 30 s") from None
                time.sleep(0.05)

    def stats(self) -> dict[str, Any]:
        """``received``, ``first`` and ``last`` arrival (epoch s), ``per_second`` counts."""
        reply = requests.get(self.base + "/stats", timeout=10)
        reply.raise_for_status()
        return dict(reply.json())

    def lag(self) -> dict[str, Any]:
        """Percentiles of arrival - status change (the payload's timestamp), per event type."""
        reply = requests.get(self.base + "/lag", timeout=30)
        reply.raise_for_status()
        return dict(reply.json())

    @property
    def received(self) -> int:
        """Callback POSTs the sink has answered."""
        return int(self.stats()["received"])

    def close(self) -> None:
        """Nothing to do here: the sink is a child the system stops with the others."""
