"""Counting committed (and skipped) steps in etcd, from a thread of its own.

A trainer's commit never waits for etcd: the count is queued here and sent by the reporter
thread, in order, as soon as etcd takes it, also after etcd was away for a while. The machine's
part of a recovery timeline (restored, first step) travels the same way, for the same reason.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from gemini_ckpt.coordination.job import JobCoordinator
from gemini_ckpt.errors import CoordinationError

log = logging.getLogger(__name__)


class StepReporter:
    """`start()`, `queue(...)` from any thread, `close()`."""

    def __init__(
        self,
        coordinator: JobCoordinator,
        machine: int,
        timeline: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> None:
        self._coordinator = coordinator
        self._machine = machine
        self._timeline = timeline
        self._pending: list[tuple[str, Callable[[], None]]] = []
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
        if kind == "skipped":
            send = lambda: self._coordinator.report_skipped(generation, step)  # noqa: E731
        else:
            machine = self._machine
            send = lambda: self._coordinator.report_committed(generation, step, machine)  # noqa: E731
        self._add(f"step {step} of generation {generation}", send)

    def queue_timeline(self, generation: int, fields: dict[str, Any]) -> None:
        """Add `fields` to this machine's part of `generation`'s recovery timeline."""
        if self._timeline is not None:
            timeline = self._timeline
            self._add(f"timeline of generation {generation}", lambda: timeline(generation, fields))

    def _add(self, what: str, send: Callable[[], None]) -> None:
        with self._lock:
            self._pending.append((what, send))
        self._wanted.set()

    def flush(self) -> None:
        """Send what is queued, oldest first, until etcd refuses."""
        with self._flushing:
            while True:
                with self._lock:
                    if not self._pending:
                        return
                    what, send = self._pending[0]
                try:
                    send()
                except CoordinationError as e:
                    log.warning("etcd did not take %s yet: %s", what, e)
                    return
                with self._lock:
                    self._pending.pop(0)

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wanted.wait(0.5)
            self._wanted.clear()
            self.flush()
