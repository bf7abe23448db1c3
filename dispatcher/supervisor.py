"""Child processes in their own process groups, started with a log and stopped by group.

One implementation for ``dispatcher run`` (:mod:`dispatcher.devserver`), the
benchmark (``bench/harness.py``) and the system tests (``tests/engine/system.py``).
Each child gets a new session, so its PID is also its process group id; stopping
it signals that group only (Celery's pool children included) and never anything
this process did not start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

from dispatcher.config import PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]
STOP_GRACE = 15.0


def child_env(settings: Settings, *, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment that rebuilds ``settings`` in a child: ``base`` minus every
    ``DISPATCHER_*`` variable, plus :meth:`Settings.to_env`."""
    base = os.environ if base is None else base
    env = {k: v for k, v in base.items() if not k.startswith(PREFIX)}
    env.update(settings.to_env())
    # Children import dispatcher, api and workers from this checkout, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), base.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Child:
    """One child process in its own process group; ``log`` takes its stdout and stderr
    (``None``: they stay ours, as ``dispatcher run`` wants)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: Mapping[str, str],
        log: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log = log
        self._out: IO[bytes] | None = log.open("wb") if log is not None else None
        self.proc = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=cwd,
            stdout=self._out,
            stderr=subprocess.STDOUT if self._out is not None else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        """What the child wrote to its log so far ('' without a log)."""
        if self.log is None:
            return ""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal the child's process group (a no-op once the group is gone)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, grace: float = STOP_GRACE, *, warm: bool = False) -> bool:
        """SIGTERM the group (``warm``: the child alone, which stops its own children),
        SIGKILL the group after ``grace``; True if SIGTERM was enough."""
        self.terminate(warm=warm)
        return self.finish(grace)

    def terminate(self, *, warm: bool = False) -> None:
        """The first half of :meth:`stop`: SIGTERM, without waiting."""
        if self.proc.poll() is None:
            if warm:
                # Celery's warm shutdown lets the pool finish its tasks; a SIGTERM to
                # the pool processes themselves would kill those tasks mid-way.
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)
            else:
                self.kill_group(signal.SIGTERM)

    def finish(self, grace: float = STOP_GRACE) -> bool:
        """The second half of :meth:`stop`: wait up to ``grace`` for the child to exit,
        then SIGKILL its group; True if it exited by itself."""
        clean = True
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                clean = False
                self.kill_group(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=grace)
        # Celery's pool children share the group: leave none behind.
        self.kill_group(signal.SIGKILL)
        if self._out is not None:
            with contextlib.suppress(OSError):
                self._out.close()
        return clean


class Supervisor:
    """The children of one run, stopped newest first (so Redis, started first, stops last);
    ``warm``: each by a SIGTERM to the child alone (see :meth:`Child.stop`)."""

    def __init__(self, *, grace: float = STOP_GRACE, warm: bool = False) -> None:
        self.grace = grace
        self.warm = warm
        self.children: list[Child] = []

    def add(self, child: Child) -> Child:
        """Take ``child`` (just started) into this run."""
        self.children.append(child)
        return child

    def dead(self) -> Child | None:
        """The first child that has exited, if any."""
        return next((c for c in self.children if not c.alive()), None)

    def stop_child(self, child: Child) -> None:
        child.stop(self.grace, warm=self.warm)
        self.children.remove(child)

    def stop(
        self, *, on_stop: Callable[[Child], None] | None = None, together: bool = False
    ) -> None:
        """Stop every child, newest first; ``on_stop`` hears of each one before it stops.

        ``together``: every child but the first is signalled at once and waited for,
        then the first stops: the one the others need to the end (``dispatcher run``
        starts its Redis first; a worker's warm shutdown still acknowledges its tasks
        there). A stop then takes about as long as the slowest child's, not their sum.
        """
        if together and len(self.children) > 1:
            first, *rest = self.children
            for child in reversed(rest):
                if on_stop is not None:
                    on_stop(child)
                child.terminate(warm=self.warm)
            for child in reversed(rest):
                child.finish(self.grace)
            self.children[:] = [first]
        for child in reversed(self.children):
            if on_stop is not None:
                on_stop(child)
            child.stop(self.grace, warm=self.warm)
        self.children.clear()

    def watch(self, stopping: Callable[[], bool], poll: float = 0.5) -> Child | None:
        """Block until ``stopping()`` is true or a child dies; returns the dead child."""
        while not stopping():
            if (child := self.dead()) is not None:
                return child
            time.sleep(poll)
        return None

    def keep(
        self,
        stopping: Callable[[], bool],
        *,
        restart: Callable[[Child], bool],
        poll: float = 0.5,
    ) -> Child | None:
        """Like :meth:`watch`, but a child that dies is handed to ``restart``, which
        starts it again and returns True, or returns False: then it is the one returned."""
        while (dead := self.watch(stopping, poll)) is not None:
            self.stop_child(dead)  # its pool children too, and its log closed
            if not restart(dead):
                return dead
        return None


class Restarts:
    """Whether a child that exited may be started again: at most ``limit`` times within
    ``window`` seconds. More than that is a crash loop (a bad setting, a broken
    dependency), which starting it again would only hide."""

    def __init__(
        self, *, limit: int = 3, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._at: dict[str, list[float]] = {}

    def allow(self, name: str) -> bool:
        """True (and counted) if ``name`` may start again now."""
        now = self._clock()
        recent = [t for t in self._at.get(name, []) if now - t < self.window]
        if len(recent) >= self.limit:
            return False
        self._at[name] = [*recent, now]
        return True
