"""What our processes cost while a phase runs: RSS, CPU per role, and the machine's noise.

Reads /proc directly (psutil is used for RSS when installed); the processes are
found by process group, so a worker's pool children are counted with it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol


class Sampled(Protocol):
    """A child the sampler can attribute: its PID (= process group) and its role."""

    @property
    def pid(self) -> int: ...

    role: str

    def alive(self) -> bool: ...


# A Sampled whose ``by_parent`` is true is a process and its children, not a process group.


def group_pids(pgids: set[int]) -> list[int]:
    """Every live process whose process group is one of ``pgids``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) in pgids:
            pids.append(int(entry.name))
    return pids


def parent_pid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def niceness(pid: int) -> str:
    """A process's niceness and its autogroup's ("10 ag 10"), as the scheduler sees them."""
    try:
        nice = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16]
    except (OSError, IndexError):
        return "?"
    with contextlib.suppress(OSError, IndexError):
        return f"{nice} ag {Path(f'/proc/{pid}/autogroup').read_text().split()[-1]}"
    return nice


def rss_bytes(pid: int) -> int:
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        pass
    except Exception:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


TICK = os.sysconf("SC_CLK_TCK")


def group_cpu(
    pgids: set[int], parents: frozenset[int] | set[int] = frozenset()
) -> dict[int, tuple[int, float]]:
    """pid -> (key, CPU seconds user+system) for every process of the process groups
    ``pgids`` (key: the group), and for every process in ``parents`` or whose parent is
    one of them (key: that parent; PostgreSQL backends each start their own session)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid, ppid, pgid = int(entry.name), int(fields[1]), int(fields[2])
        key = pgid if pgid in pgids else pid if pid in parents else ppid
        if key in pgids or key in parents:
            found[pid] = (key, (int(fields[11]) + int(fields[12])) / TICK)
    return found


def system_busy_s() -> float:
    """CPU seconds spent busy by the whole machine (all cores) since boot."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[:8])
    return (user + nice + system + irq + softirq + steal) / TICK


class ProcSampler(threading.Thread):
    """Samples our processes while a phase runs: worker RSS, CPU seconds per role, and the
    CPU used by everything else on the machine (other people's jobs: the noise)."""

    def __init__(self, children: Callable[[], Iterable[Sampled]], interval: float = 0.5) -> None:
        super().__init__(daemon=True, name="proc-sampler")
        self.children = children
        self.interval = interval
        self.stop_event = threading.Event()
        self.peak_process = 0
        self.peak_total = 0
        self.worker_pids: set[int] = set()
        # (seconds since start, summed RSS of every worker process) per sample.
        self.rss_series: list[tuple[float, int]] = []
        self.cpu: dict[int, tuple[str, float]] = {}
        # A worker's processes by what they are: "send0 main", "send0 pool" (its children).
        self.part: dict[int, str] = {}
        self.cpu_start: dict[int, float] = {}
        # Niceness of each child's main process (dispatcher/priority.py), read once.
        self.nice = {getattr(c, "name", c.role): niceness(c.pid) for c in self.children()}
        self.t0 = time.monotonic()
        self.t1 = self.t0
        self.busy0 = system_busy_s()
        self.busy1 = self.busy0
        self.self0 = sum(os.times()[:2])
        self.self1 = self.self0
        self._sample(first=True)

    def _sample(self, first: bool = False) -> None:
        live = [c for c in self.children() if c.alive()]
        roles = {c.pid: c.role for c in live}
        names = {c.pid: getattr(c, "name", c.role) for c in live}
        parents = {c.pid for c in live if getattr(c, "by_parent", False)}
        procs = group_cpu(set(roles) - parents, parents)
        sizes = []
        for pid, (pgid, cpu) in procs.items():
            role = roles[pgid]
            if first:
                self.cpu_start[pid] = cpu
            self.cpu[pid] = (role, cpu)
            self.part[pid] = f"{names[pgid]} {'main' if pid == pgid else 'pool'}"
            if role == "worker":
                self.worker_pids.add(pid)
                sizes.append(rss_bytes(pid))
        self.rss_series.append((time.monotonic() - self.t0, sum(sizes)))
        if sizes:
            self.peak_process = max(self.peak_process, max(sizes))
            self.peak_total = max(self.peak_total, sum(sizes))
        self.t1 = time.monotonic()
        self.busy1 = system_busy_s()
        self.self1 = sum(os.times()[:2])

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            with contextlib.suppress(Exception):
                self._sample()

    def finish(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)
        with contextlib.suppress(Exception):
            self._sample()

    def cpu_by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, (role, cpu) in self.cpu.items():
            out[role] = out.get(role, 0.0) + cpu - self.cpu_start.get(pid, 0.0)
        out["bench"] = self.self1 - self.self0
        return {k: round(v, 2) for k, v in sorted(out.items())}

    def worker_cpu_by_process(self) -> dict[str, float]:
        """Workers' CPU seconds: each main process (Celery's consumer, task events) apart
        from its pool processes (the task bodies)."""
        out: dict[str, float] = {}
        for pid, (role, cpu) in self.cpu.items():
            if role == "worker":
                part = self.part[pid]
                out[part] = out.get(part, 0.0) + cpu - self.cpu_start.get(pid, 0.0)
        return {k: round(v, 2) for k, v in sorted(out.items())}

    def rss_over_time(self) -> dict[str, Any]:
        """Workers' summed RSS: first, last, min and max sample, and 10 evenly spaced ones (MB)."""
        mb = [round(rss / 2**20, 1) for _, rss in self.rss_series if rss]
        if not mb:
            return {}
        step = max(1, len(mb) // 10)
        return {
            "first_mb": mb[0],
            "last_mb": mb[-1],
            "min_mb": min(mb),
            "max_mb": max(mb),
            "samples_mb": mb[::step],
            "samples": len(mb),
        }

    def result(self, recipients: int) -> dict[str, Any]:
        wall = max(self.t1 - self.t0, 1e-9)
        by_role = self.cpu_by_role()
        ours = sum(by_role.values())
        machine_busy = self.busy1 - self.busy0
        ncpu = os.cpu_count() or 1
        return {
            "worker_peak_rss_mb": round(self.peak_process / 2**20, 1),
            "worker_peak_rss_total_mb": round(self.peak_total / 2**20, 1),
            "worker_processes_sampled": len(self.worker_pids),
            "cpu_s_by_role": by_role,
            "worker_cpu_s_by_process": self.worker_cpu_by_process(),
            "worker_cpu_ms_per_recipient": round(
                1000 * by_role.get("worker", 0.0) / max(recipients, 1), 3
            ),
            "wall_s": round(wall, 2),
            "machine_busy_pct": round(100 * machine_busy / (wall * ncpu), 1),
            "foreign_cpu_pct": round(100 * max(machine_busy - ours, 0.0) / (wall * ncpu), 1),
            "nice_by_process": self.nice,
        }
