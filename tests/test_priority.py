"""CPU priority per role (dispatcher/priority.py): the setting, and the niceness real processes
give themselves when started as `dispatcher run` starts them (read back from /proc)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher import priority
from dispatcher.config import ConfigError, Settings
from dispatcher.devserver import commands
from dispatcher.supervisor import ROOT, Child, child_env
from tests.helpers import answers, free_port, wait_for

pytestmark = pytest.mark.system


def nice_of(pid: int) -> int:
    """The niceness the scheduler holds for ``pid`` (field 19 of /proc/<pid>/stat)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a worker's pool, gunicorn's workers)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


# -- the setting


def test_process_nice_reads_role_pairs_and_round_trips_through_the_environment() -> None:
    settings = Settings.from_env({"DISPATCHER_PROCESS_NICE": "send=5, callbacks=0"})
    assert settings.process_nice == {"send": 5, "callbacks": 0}
    assert Settings.from_env(settings.to_env()).process_nice == {"send": 5, "callbacks": 0}


@pytest.mark.parametrize("off", ["off", "OFF", "none", ""])
def test_process_nice_off_is_an_empty_mapping(off: str) -> None:
    settings = Settings.from_env({"DISPATCHER_PROCESS_NICE": off})
    assert settings.process_nice == {}
    assert Settings.from_env(settings.to_env()).process_nice == {}


def test_process_nice_is_off_by_default() -> None:
    assert Settings().process_nice == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("flower=3", "unknown roles ['flower']"),
        ("send=-1", "PROCESS_NICE[send] must be 0-19"),
        ("send=20", "PROCESS_NICE[send] must be 0-19"),
        ("send", "expected name=niceness"),
        ("send=fast", "DISPATCHER_PROCESS_NICE"),
    ],
)
def test_process_nice_refuses_what_no_process_could_apply(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Settings.from_env({"DISPATCHER_PROCESS_NICE": text})


def test_a_worker_on_several_queues_takes_the_least_nice_role() -> None:
    nice = {"send": 10, "callbacks": 3}
    assert priority.role_of_queues(["send"], nice) == "send"
    assert priority.role_of_queues(["dispatch", "send"], nice) == "dispatch"
    assert priority.role_of_queues(["send", "callbacks"], nice) == "callbacks"
    assert priority.role_of_queues(["bench-noop"], nice) is None


# -- apply(), in a fresh process


def _apply_in_child(code: str, *, own_session: bool) -> list[int]:
    """Run ``code`` (after importing priority) in a child; it prints integers."""
    out = subprocess.run(
        [sys.executable, "-c", f"import os\nfrom dispatcher import priority\n{code}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        start_new_session=own_session,
        check=True,
    ).stdout
    return [int(word) for word in out.split()]


def test_apply_never_lowers_a_niceness_the_process_already_has() -> None:
    code = (
        "os.nice(12)\npriority.apply('send', {'send': 7})\n"
        "print(os.getpriority(os.PRIO_PROCESS, 0))"
    )
    assert _apply_in_child(code, own_session=True) == [12]


def test_apply_raises_every_thread_of_the_process() -> None:
    code = (
        "import threading\nstop = threading.Event()\n"
        "t = threading.Thread(target=stop.wait); t.start()\n"
        "priority.apply('send', {'send': 6})\n"
        "print(os.getpriority(os.PRIO_PROCESS, t.native_id), os.getpriority(os.PRIO_PROCESS, 0))\n"
        "stop.set()"
    )
    assert _apply_in_child(code, own_session=True) == [6, 6]


needs_autogroup = pytest.mark.skipif(
    priority.autogroup_nice() is None, reason="kernel without autogroups"
)


@needs_autogroup
def test_a_session_leader_raises_its_autogroup_and_a_follower_leaves_it() -> None:
    code = "priority.apply('send', {'send': 4})\nprint(priority.autogroup_nice())"
    assert _apply_in_child(code, own_session=True) == [4]
    # Not leading its session, it shares the autogroup with this test: left alone.
    before = priority.autogroup_nice()
    assert _apply_in_child(code, own_session=False) == [before]


# -- the processes `dispatcher run` starts


@pytest.fixture()
def started(tmp_path: Path) -> Iterator[list[Child]]:
    children: list[Child] = []
    yield children
    # All stop at once (each waits for its own warm shutdown otherwise).
    for child in children:
        child.kill_group(signal.SIGTERM)
    for child in reversed(children):
        child.stop()


def _start(settings: Settings, name: str, log_dir: Path, started: list[Child]) -> Child:
    child = Child(
        name, commands(settings)[name], env=child_env(settings), log=log_dir / name, cwd=ROOT
    )
    started.append(child)
    return child


def _settings(tmp_path: Path, sqlite_url: str, redis_url: str, nice: str) -> Settings:
    (tmp_path / "var").mkdir(exist_ok=True)
    return Settings.from_env(
        {"DISPATCHER_PROCESS_NICE": nice},
        var_dir=str(tmp_path / "var"),
        database_url=sqlite_url,
        redis_url=redis_url,
        api_port=free_port(),
        send_concurrency=2,
    )


def test_each_process_started_as_dispatcher_run_starts_it_takes_its_roles_niceness(
    tmp_path: Path, sqlite_url: str, redis_url: str, started: list[Child]
) -> None:
    settings = _settings(tmp_path, sqlite_url, redis_url, "api=3,send=7,beat=2,callbacks=1")
    api = _start(settings, "api", tmp_path, started)
    send = _start(settings, "send-worker", tmp_path, started)
    dispatch = _start(settings, "dispatch-worker", tmp_path, started)
    beat = _start(settings, "beat", tmp_path, started)

    wait_for(lambda: "ready." in send.output() and "ready." in dispatch.output(), timeout=60)
    wait_for(lambda: "beat: Starting" in beat.output(), timeout=60)
    base = f"http://{settings.api_host}:{settings.api_port}"
    wait_for(lambda: answers(base + "/health/live"), timeout=60)
    # The pool processes and gunicorn's workers inherit what their parent set.
    assert [nice_of(p) for p in (send.pid, *children_of(send.pid))] == [7, 7, 7]
    assert {nice_of(p) for p in (api.pid, *children_of(api.pid))} == {3}
    assert len(children_of(api.pid)) == settings.api_workers
    assert nice_of(beat.pid) == 2
    # Not named: the dispatch worker keeps the niceness it was started with (this one's).
    assert {nice_of(p) for p in (dispatch.pid, *children_of(dispatch.pid))} == {
        nice_of(os.getpid())
    }
    if priority.autogroup_nice() is not None:
        assert priority.autogroup_nice(Path(f"/proc/{send.pid}/autogroup")) == 7
        assert priority.autogroup_nice(Path(f"/proc/{api.pid}/autogroup")) == 3


def test_process_nice_off_leaves_a_send_worker_as_started(
    tmp_path: Path, sqlite_url: str, redis_url: str, started: list[Child]
) -> None:
    settings = _settings(tmp_path, sqlite_url, redis_url, "off")
    send = _start(settings, "send-worker", tmp_path, started)
    wait_for(lambda: "ready." in send.output(), timeout=60)
    unchanged = nice_of(os.getpid())
    assert [nice_of(p) for p in (send.pid, *children_of(send.pid))] == [unchanged] * 3
    if priority.autogroup_nice() is not None:
        # A new session's autogroup starts at niceness 0.
        assert priority.autogroup_nice(Path(f"/proc/{send.pid}/autogroup")) == 0
