"""A Celery app for tests: the real one plus a task that kills its worker on every delivery."""

from __future__ import annotations

import os

from workers.celery_app import create_celery
from workers.tasks import DispatcherTask

app = create_celery()

# Every run leaves a mark first, so the test can count the deliveries that ran.
RUNS = "test:poison:runs"


@app.task(base=DispatcherTask, bind=True, name="test_poison", shared=False)
def poison(self: DispatcherTask) -> None:
    self.runtime.redis.rpush(RUNS, os.getpid())
    os._exit(1)
