"""dispatcher/supervisor.py: children in their own process groups, stopped by group only."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from dispatcher.config import Settings
from dispatcher.supervisor import Child, Restarts, Supervisor, child_env
from tests.helpers import wait_for

# A parent that starts a grandchild in its own group (like Celery's pool), prints both
# PIDs and waits; with "stubborn" both ignore SIGTERM.
FAMILY = """
import os, signal, subprocess, sys
if sys.argv[1] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
code = "import signal, sys\\nif sys.argv[1] == 'stubborn':\\n" \\
    "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\\nwhile True: signal.pause()"
kid = subprocess.Popen([sys.executable, "-c", code, sys.argv[1]])
print(os.getpid(), kid.pid, flush=True)
while True:
    signal.pause()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0 until its parent reaps it.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _family(tmp_path: Path, mode: str) -> Child:
    """A child running FAMILY (``polite`` or ``stubborn`` about SIGTERM), logging its pids."""
    return Child(mode, [sys.executable, "-c", FAMILY, mode], env=os.environ, log=tmp_path / "f.log")


def _pids(child: Child) -> tuple[int, int]:
    line = wait_for(lambda: child.output().strip(), timeout=20)
    parent, kid = (int(p) for p in line.split())
    return parent, kid


def test_a_child_and_its_own_children_get_one_group_and_stop_together(tmp_path: Path) -> None:
    child = _family(tmp_path, "polite")
    parent, kid = _pids(child)
    assert parent == child.pid
    assert os.getpgid(parent) == os.getpgid(kid) == child.pid != os.getpgid(0)
    assert child.stop(grace=10) is True
    assert child.returncode == -signal.SIGTERM
    wait_for(lambda: not _alive(kid), timeout=10)


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    child = _family(tmp_path, "stubborn")
    _, kid = _pids(child)
    assert child.stop(grace=0.5) is False
    assert child.returncode == -signal.SIGKILL
    wait_for(lambda: not _alive(kid), timeout=10)


def test_the_supervisor_stops_newest_first_and_reports_a_dead_child(tmp_path: Path) -> None:
    sup = Supervisor(grace=10)
    sleeper = [sys.executable, "-c", "import signal; signal.pause()"]
    first = sup.add(Child("first", sleeper, env=os.environ, log=tmp_path / "first.log"))
    quitter = sup.add(
        Child("quitter", [sys.executable, "-c", "pass"], env=os.environ, log=tmp_path / "q.log")
    )
    last = sup.add(Child("last", sleeper, env=os.environ, log=tmp_path / "last.log"))
    assert sup.watch(lambda: False, poll=0.05) is quitter
    order: list[str] = []
    sup.stop(on_stop=lambda c: order.append(c.name))
    assert order == ["last", "quitter", "first"]
    assert sup.children == []
    assert not first.alive() and not last.alive()


# Takes a second to stop once told (as a Celery worker's warm shutdown does), and logs
# when it was told and when it exited.
SLOW_TO_STOP = """
import signal, threading, time
told = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: told.set())
print("up", flush=True)
told.wait(60)
print("told", time.monotonic(), flush=True)
threading.Event().wait(1.0)
print("exited", time.monotonic(), flush=True)
"""


def test_together_the_children_stop_at_once_and_the_first_after_them(tmp_path: Path) -> None:
    """What ``dispatcher run`` does on Ctrl-C: Redis (started first) outlives the others,
    which stop side by side: the stop takes about one child's time, not their sum."""
    sup = Supervisor(grace=10, warm=True)
    names = ["redis", "api", "worker", "beat"]
    children = {
        name: sup.add(
            Child(name, [sys.executable, "-c", SLOW_TO_STOP], env=os.environ, log=tmp_path / name)
        )
        for name in names
    }
    wait_for(lambda: all("up" in c.output() for c in children.values()), timeout=20)
    order: list[str] = []
    sup.stop(on_stop=lambda c: order.append(c.name), together=True)
    assert order == ["beat", "worker", "api", "redis"]
    assert sup.children == []
    when = {
        name: {
            word: float(at)
            for word, at in (line.split() for line in child.output().splitlines()[1:])
        }
        for name, child in children.items()
    }
    rest = [when[name] for name in names[1:]]
    assert max(t["told"] for t in rest) < min(t["exited"] for t in rest)
    assert when["redis"]["told"] >= max(t["exited"] for t in rest)
    assert all(child.returncode == 0 for child in children.values())


def test_a_child_that_exits_is_started_again_until_restart_says_no(tmp_path: Path) -> None:
    """What ``dispatcher run`` does when a worker exits (a Redis outage can end one)."""
    sup = Supervisor(grace=10)
    sleeper = sup.add(
        Child("steady", [sys.executable, "-c", "import signal; signal.pause()"], env=os.environ)
    )
    quitter = [sys.executable, "-c", "raise SystemExit(3)"]
    started = [sup.add(Child("quitter", quitter, env=os.environ, log=tmp_path / "q0.log"))]

    def restart(dead: Child) -> bool:
        assert dead is started[-1] and dead.returncode == 3
        assert dead not in sup.children  # stopped (its group too) and forgotten
        if len(started) == 3:
            return False
        log = tmp_path / f"q{len(started)}.log"
        started.append(sup.add(Child("quitter", quitter, env=os.environ, log=log)))
        return True

    assert sup.keep(lambda: False, restart=restart, poll=0.05) is started[-1]
    assert len(started) == 3 and sup.children == [sleeper] and sleeper.alive()
    sup.stop()


def test_keep_returns_nothing_once_stopping(tmp_path: Path) -> None:
    sup = Supervisor(grace=10)
    sup.add(
        Child("steady", [sys.executable, "-c", "import signal; signal.pause()"], env=os.environ)
    )
    assert sup.keep(lambda: True, restart=lambda dead: True, poll=0.05) is None
    sup.stop()
    assert sup.children == []


def test_restarts_stop_at_a_crash_loop() -> None:
    now = [0.0]
    restarts = Restarts(limit=3, window=60.0, clock=lambda: now[0])
    assert [restarts.allow("send-worker") for _ in range(4)] == [True, True, True, False]
    assert restarts.allow("api")  # counted per process
    now[0] = 59.0
    assert not restarts.allow("send-worker")
    now[0] = 60.5  # the first three are older than the window now
    assert restarts.allow("send-worker")


def test_child_env_rebuilds_the_settings_and_drops_foreign_dispatcher_variables(
    tmp_path: Path,
) -> None:
    settings = Settings(
        var_dir=str(tmp_path),
        chunk_size=123,
        simulator={"latency_ms": 5},
        callback_allowlist=("127.0.0.1",),
    )
    env = child_env(
        settings, base={"DISPATCHER_NOT_A_FIELD": "x", "HOME": "/home/h", "PYTHONPATH": "/extra"}
    )
    assert "DISPATCHER_NOT_A_FIELD" not in env
    assert env["HOME"] == "/home/h"
    assert env["PYTHONPATH"].split(os.pathsep)[-1] == "/extra"
    assert Settings.from_env(env) == settings
