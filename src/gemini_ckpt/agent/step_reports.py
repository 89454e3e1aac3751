"""Counting committed (and skipped) steps in etcd, from a thread of its own.

A trainer's commit never waits for etcd: the count is queued here and sent by the reporter
thread, in order, as soon as etcd takes it, also after etcd was away for a while.
"""

from __future__ import annotations

import logging
import threading

from gemini_ckpt.coordination.job import JobCoordinator
from gemini_ckpt.errors import CoordinationError

log = logging.getLogger(__name__)


class StepReporter:
    """`start()`, `queue(...)` from any thread, `close()`."""

    def __init__(self, coordinator: JobCoordinator) -> None:
        self._coordinator = coordinator
        self._pending: list[tuple[int, int, str]] = []
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._wanted = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the reporter thread."""
        self._thread = threading.Thread(target=self._run, name="gemini-report", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread (counts not sent by then are dropped: the job is over)."""
        self._closed.set()
        self._wanted.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def queue(self, generation: int, step: int, kind: str) -> None:
        """Count `step` of `generation` as "committed" or "skipped" on this machine."""
        with self._lock:
            self._pending.append((generation, step, kind))
        self._wanted.set()

    def flush(self) -> None:
        """Send what is queued, oldest first, until etcd refuses."""
        with self._flushing:
            while True:
                with self._lock:
                    if not self._pending:
                        return
                    generation, step, kind = self._pending[0]
                try:
                    if kind == "skipped":
                        self._coordinator.report_skipped(generation, step)
                    else:
                        self._coordinator.report_committed(generation, step)
                except CoordinationError as e:
                    log.warning(
                        "etcd did not take step %d of generation %d yet: %s", step, generation, e
                    )
                    return
                with self._lock:
                    self._pending.pop(0)

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wanted.wait(0.5)
            self._wanted.clear()
            self.flush()
