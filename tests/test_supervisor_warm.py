"""A warm stop: SIGTERM to a child's leader only, so its own children finish their work
(Celery's warm shutdown) before the group is killed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from dispatcher.supervisor import Child, Supervisor
from tests.helpers import wait_for

# A leader whose child (in its group, like a Celery pool process) works for a moment; on
# SIGTERM the leader waits for that work and exits 1 if it did not finish, as Celery's
# main process waits for its pool.
BUSY = """
import signal, subprocess, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
work = "import threading\\nprint('started', flush=True)\\n" \\
    "threading.Event().wait(1)\\nprint('finished')"
unblock = lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
kid = subprocess.Popen([sys.executable, "-c", work], preexec_fn=unblock)
signal.sigwait({signal.SIGTERM})
kid.wait()
sys.exit(0 if kid.returncode == 0 else 1)
"""


@pytest.mark.parametrize(("warm", "said"), [(True, "started\nfinished\n"), (False, "started\n")])
def test_a_warm_stop_lets_the_leader_stop_its_children(
    tmp_path: Path, warm: bool, said: str
) -> None:
    sup = Supervisor(grace=10, warm=warm)
    child = sup.add(
        Child("busy", [sys.executable, "-c", BUSY], env=os.environ, log=tmp_path / "busy.log")
    )
    wait_for(lambda: "started" in child.output(), timeout=20)
    sup.stop()
    assert child.output() == said
    assert child.returncode == (0 if warm else 1)
