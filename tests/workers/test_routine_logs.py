"""Celery's routine lines about frequent periodic tasks go to DEBUG; everything else keeps
its level. The lines come from Celery's own code (beat's scheduler, the tracer that runs
a task) through its own loggers, into the handler the workers and beat install."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.app import trace
from celery.beat import ScheduleEntry, Scheduler
from celery.worker import strategy

from dispatcher import logs
from dispatcher.config import Settings
from dispatcher.outbox import TaskName
from workers import telemetry
from workers.celery_app import beat_schedule


def test_the_routine_tasks_are_those_beat_runs_more_often_than_once_a_minute() -> None:
    routine = telemetry.frequent_tasks(beat_schedule(Settings()))

    assert {TaskName.PROMOTE_DUE, TaskName.PROMOTE_CALLBACKS, TaskName.EXPIRE_DUE} <= routine
    # Every 75 s (a quarter of the send lease) and every hour: their lines stay at INFO.
    assert not {TaskName.RECLAIM_STALE, TaskName.PURGE_RETENTION} & routine
    # Read from the schedule: a shorter lease makes the reclaim frequent too.
    assert TaskName.RECLAIM_STALE in telemetry.frequent_tasks(
        beat_schedule(Settings(send_lease=100.0))
    )


@pytest.fixture
def app() -> Iterator[Celery]:
    """A Celery app on an in-memory broker with a frequent periodic task (every 2 s),
    a failing one (every 30 s) and a task beat never runs."""
    app = Celery("routine", broker="memory://localhost/")
    app.conf.update(
        task_ignore_result=True,
        beat_schedule={
            "often-task": {"task": "often_task", "schedule": 2.0},
            "failing-task": {"task": "failing_task", "schedule": 30.0},
            "hourly-task": {"task": "hourly_task", "schedule": 3600.0},
        },
    )

    @app.task(name="often_task", shared=False)
    def often_task() -> int:
        return 0

    @app.task(name="failing_task", shared=False)
    def failing_task() -> int:
        raise RuntimeError("the database is gone")

    @app.task(name="one_off_task", shared=False)
    def one_off_task() -> int:
        return 1

    yield app
    app.close()


@pytest.fixture
def configure(capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    """Set up logging as a worker's setup_logging does; restores the loggers after."""
    root = logging.getLogger()
    level = root.level

    def configure(app: Celery, *, log_format: str, log_level: str) -> None:
        # Its handler writes to capsys's stderr.
        logs.configure(Settings(log_format=log_format, log_level=log_level))
        telemetry.quiet_routine(telemetry.frequent_tasks(app.conf.beat_schedule))

    yield configure
    for handler in [h for h in root.handlers if h.get_name() == "dispatcher"]:
        root.removeHandler(handler)
    root.setLevel(level)
    for name in telemetry.ROUTINE_LOGGERS:
        logger = logging.getLogger(name)
        for quiet in [f for f in logger.filters if isinstance(f, telemetry.RoutineAtDebug)]:
            logger.removeFilter(quiet)


def run_everything(app: Celery) -> None:
    """What beat and a worker log for each task: sent, received, then its outcome."""
    scheduler = Scheduler(app, lazy=True)
    for name, entry in app.conf.beat_schedule.items():
        scheduler.apply_entry(ScheduleEntry(name=name, app=app, **entry))
    for name in ("often_task", "failing_task", "one_off_task"):
        # The worker's own call when a task message arrives (celery.worker.strategy).
        context = {"id": f"id-{name}", "name": name, "args": "()", "kwargs": "{}", "eta": None}
        strategy.logger.info(trace.LOG_RECEIVED, context, extra={"data": context})
        app.tasks[name].apply()  # the tracer logs its success or its failure


def lines(err: str, fmt: str) -> list[tuple[str, str]]:
    """(level, message) of each log line on stderr."""
    if fmt == "json":
        return [(d["level"], d["message"]) for d in map(json.loads, err.splitlines())]
    out = []
    for line in err.splitlines():
        if line[:4].isdigit():  # a new record (a traceback's lines follow it)
            level, rest = line.split()[2], line.split(": ", 1)[1]
            out.append((level, rest))
    return out


def about(found: list[tuple[str, str]], task: str) -> list[tuple[str, str]]:
    return [
        (level, message)
        for level, message in found
        if f"{task}[" in message or f"({task})" in message
    ]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_at_info_a_frequent_periodic_tasks_lines_are_gone_and_the_rest_stay(
    app: Celery, configure: Any, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    configure(app, log_format=fmt, log_level="INFO")

    run_everything(app)

    found = lines(capsys.readouterr().err, fmt)
    assert about(found, "often_task") == []
    # Not frequent: sent, received and succeeded, at INFO.
    assert [level for level, _ in about(found, "hourly_task")] == ["INFO"]
    assert [level for level, _ in about(found, "one_off_task")] == ["INFO", "INFO"]
    # Every 30 s is frequent too, but a failure is an ERROR whatever the task.
    assert [level for level, _ in about(found, "failing_task")] == ["ERROR"]
    assert "the database is gone" in about(found, "failing_task")[0][1]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_at_debug_a_frequent_periodic_tasks_lines_are_shown_at_debug(
    app: Celery, configure: Any, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    configure(app, log_format=fmt, log_level="DEBUG")

    run_everything(app)

    found = lines(capsys.readouterr().err, fmt)
    routine = about(found, "often_task")
    assert [level for level, _ in routine] == ["DEBUG"] * 3
    assert routine[0][1] == "Scheduler: Sending due task often-task (often_task)"
    assert routine[1][1] == "Task often_task[id-often_task] received"
    assert routine[2][1].startswith("Task often_task[") and " succeeded in " in routine[2][1]
    assert [level for level, _ in about(found, "one_off_task")] == ["INFO", "INFO"]
