"""The inference thread, watched: a batch that computes far longer than any should means the
backend hung (a GPU that stopped answering, a runtime deadlocked in a kernel), and the process
exits so that it is started again, by the supervisor under ``--workers`` and by Kubernetes (or
whatever runs it) otherwise, as gunicorn's worker timeout and uWSGI's harakiri do. Before, a
hung backend left a process that passed every health check while its requests waited out their
deadlines and its queue filled: every client it reached was answered DEADLINE_EXCEEDED or
UNAVAILABLE for as long as it ran.

Only batches are timed: models load and warm up on other threads (serve/repository.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

log = logging.getLogger("resserve.serve")

EXIT_HUNG = 3  # the process's exit status when a batch outlived --batch-timeout


class WatchedInferenceThread(ThreadPoolExecutor):
    """The one thread batches compute on; with ``timeout_seconds`` (None: unwatched), a daemon
    thread looks at the batch running about four times a timeout (at most once a second) and ends
    the process once it has run longer."""

    def __init__(self, timeout_seconds: float | None) -> None:
        super().__init__(max_workers=1, thread_name_prefix="inference")
        self.timeout_seconds = timeout_seconds
        self._started: float | None = None  # when the job running began; None: idle
        if timeout_seconds:
            threading.Thread(target=self._watch, name="inference-watchdog", daemon=True).start()

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        return super().submit(self._timed, fn, *args, **kwargs)

    def _timed(self, fn: Callable, *args, **kwargs):
        self._started = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            self._started = None

    def _watch(self) -> None:
        assert self.timeout_seconds
        while True:
            time.sleep(min(1.0, self.timeout_seconds / 4))
            started = self._started
            if started is not None and time.monotonic() - started > self.timeout_seconds:
                self._exit(time.monotonic() - started)

    def _exit(self, seconds: float) -> None:
        log.error("a batch has computed for %.1f s, past --batch-timeout (%g s): the backend hung; exiting with "
                  "status %d to be started again", seconds, self.timeout_seconds, EXIT_HUNG)  # stderr: written at once
        os._exit(EXIT_HUNG)  # the inference thread cannot be stopped, nor the process drained through it
