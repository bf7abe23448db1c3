"""CPU priority per process role: each process raises its own niceness at start.

On one host every process competes for the same cores. Accepting batches (api) is
latency-critical and callbacks must keep pace with sending, while bulk sending is
throughput work that can yield for a moment: ``Settings.process_nice`` names the
niceness of each role, and each process applies its own when it starts (a Celery
worker or beat from a signal in workers/celery_app.py, gunicorn from its
``on_starting`` hook), so ``dispatcher run``, the benchmark and a hand-started
process behave alike. Forked children (pool processes, gunicorn workers) inherit it.

Niceness is only ever raised (that needs no privilege), never lowered. It orders
threads inside one scheduling group: with Linux autogroups every session is such
a group, so a process that leads its own session (as ``dispatcher run`` starts
each one) raises its autogroup's niceness too. Under systemd units or containers
each in its own cgroup, cgroup CPU weights decide instead (docs/operations.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# The roles whose niceness can be configured, and the role of each queue a worker serves.
ROLES = ("api", "dispatch", "send", "callbacks", "beat")
QUEUE_ROLES = {"dispatch": "dispatch", "send": "send", "callbacks": "callbacks"}
MAX_NICE = 19
AUTOGROUP = Path("/proc/self/autogroup")


@dataclass(frozen=True)
class Applied:
    """What a process did to its own priority."""

    role: str
    nice: int
    autogroup_nice: int | None


def role_of_queues(queues: Iterable[str], nice: Mapping[str, int]) -> str | None:
    """The role of a worker consuming ``queues``: the least nice of theirs (None: no known queue).

    A worker that also serves dispatch or callbacks must not slow them down because
    it sends too.
    """
    roles = [QUEUE_ROLES[q] for q in queues if q in QUEUE_ROLES]
    return min(roles, key=lambda role: nice.get(role, 0), default=None)


def apply(role: str | None, nice: Mapping[str, int]) -> Applied | None:
    """Raise this process's niceness (every thread, and its autogroup if it leads a session)
    to ``nice[role]``; never lowers it. None when the role has no niceness configured."""
    target = nice.get(role, 0) if role is not None else 0
    if role is None or target <= 0:
        return None
    for tid in _threads():
        # Linux keeps a niceness per thread; PRIO_PROCESS with a thread id sets that one.
        if os.getpriority(os.PRIO_PROCESS, tid) < target:
            os.setpriority(os.PRIO_PROCESS, tid, target)
    applied = Applied(role, os.getpriority(os.PRIO_PROCESS, 0), _raise_autogroup(target))
    log.info(
        "process priority: role %s, nice %d, autogroup nice %s",
        applied.role,
        applied.nice,
        "n/a" if applied.autogroup_nice is None else applied.autogroup_nice,
    )
    return applied


def _threads() -> list[int]:
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def autogroup_nice(path: Path = AUTOGROUP) -> int | None:
    """The niceness of this process's autogroup ("/autogroup-N nice K"); None without one."""
    try:
        return int(path.read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def _raise_autogroup(target: int) -> int | None:
    """Raise the autogroup's niceness, only when this process leads its session.

    The kernel puts each session in its own autogroup and shares the CPU between
    autogroups first, so a process's own niceness alone orders nothing against
    processes of other sessions. A process that does not lead its session shares
    the group with its parent's session (a shell, a supervisor): it leaves it alone.
    """
    current = autogroup_nice()
    if current is None or os.getsid(0) != os.getpid():
        return current
    if current < target:
        try:
            AUTOGROUP.write_text(str(target))
        except OSError as exc:
            log.warning("process priority: cannot raise the autogroup's niceness: %s", exc)
        current = autogroup_nice()
    return current
