"""A callback receiver in a process of its own: answers 204 to every POST, counts arrivals.

    python -m bench.sink --port 8080

Cheap on purpose (one asyncio loop, no HTTP framework, keep-alive connections), so that
a benchmark measures the callback worker, not its receiver. ``GET /stats`` answers JSON:
``received`` (POSTs answered), ``first`` and ``last`` (their arrival times, epoch
seconds), ``per_second`` (arrivals per whole epoch second) and ``by_type`` (for each
event type, e.g. ``message.delivered``: how many, first and last arrival). ``GET /lag``
answers how long after its status change each callback arrived (arrival - the
payload's ``timestamp``): percentiles, overall and per event type.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from collections import Counter
from datetime import datetime

_NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"
_MAX_HEAD = 65536
# The native payload's fields, as the callback worker writes them (compact JSON).
_TYPE = b'"type":"'
_TIMESTAMP = b'"timestamp":"'


class Stats:
    """What the sink has seen."""

    def __init__(self) -> None:
        self.received = 0
        self.first = 0.0
        self.last = 0.0
        self.per_second: Counter[int] = Counter()
        self.by_type: dict[str, dict[str, float]] = {}
        self.lags: dict[str, list[float]] = {}

    def arrived(self, body: bytes) -> None:
        now = time.time()
        if not self.received:
            self.first = now
        self.received += 1
        self.last = now
        self.per_second[int(now)] += 1
        name = _field(body, _TYPE) or "other"
        kind = self.by_type.setdefault(name, {"received": 0, "first": now})
        kind["received"] += 1
        kind["last"] = now
        changed = _field(body, _TIMESTAMP)
        if changed:
            at = datetime.fromisoformat(changed).timestamp()
            self.lags.setdefault(name, []).append(now - at)

    def lag_json(self) -> bytes:
        every = [lag for lags in self.lags.values() for lag in lags]
        return json.dumps(
            {
                "all": _percentiles(every),
                **{name: _percentiles(lags) for name, lags in self.lags.items()},
            }
        ).encode()

    def as_json(self) -> bytes:
        return json.dumps(
            {
                "received": self.received,
                "first": self.first,
                "last": self.last,
                "per_second": {str(k): v for k, v in sorted(self.per_second.items())},
                "by_type": self.by_type,
            }
        ).encode()


def _field(body: bytes, marker: bytes) -> str:
    """The string after ``marker`` (a byte search, not a JSON parse); "" without one."""
    start = body.find(marker)
    if start < 0:
        return ""
    start += len(marker)
    return body[start : body.find(b'"', start)].decode("ascii", "replace")


def _percentiles(values: list[float]) -> dict[str, float]:
    """count, p50, p90, p99 and max of ``values``, in seconds (rounded to the ms)."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {
        "count": len(ordered),
        "p50": at(0.5),
        "p90": at(0.9),
        "p99": at(0.99),
        "max": round(ordered[-1], 3),
    }


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: requests parsed by Content-Length only."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_HEAD:
                    self._close()
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip() or 0)
            if len(self.buf) < end + 4 + length:
                return  # the body is still coming
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            self._answer(head.split(" ", 2), body)

    def _answer(self, request_line: list[str], body: bytes) -> None:
        assert self.transport is not None
        if request_line[0] == "GET" and len(request_line) > 1:
            path = request_line[1]
            body = self.stats.as_json() if path == "/stats" else self.stats.lag_json()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            return
        self.stats.arrived(body)
        self.transport.write(_NO_CONTENT)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def serve(port: int) -> None:
    stats = Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(stats), "127.0.0.1", port, backlog=512)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"sink listening on 127.0.0.1:{port}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    asyncio.run(serve(p.parse_args().port))


if __name__ == "__main__":
    main()
