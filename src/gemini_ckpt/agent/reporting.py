"""What an agent tells the root (its status in etcd) and the log (events) about its trainers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from gemini_ckpt.agent.service import TrainerService
from gemini_ckpt.agent.workers import WorkerExit, WorkerGroup
from gemini_ckpt.coordination.control import ControlPlane
from gemini_ckpt.errors import CoordinationError
from gemini_ckpt.observability import events
from gemini_ckpt.observability.events import EventLog
from gemini_ckpt.recovery.classify import MemberReport, classify

log = logging.getLogger(__name__)


class StatusReporter:
    """Reports this machine's status and its trainers' failures and hangs."""

    def __init__(
        self,
        machine: int,
        plane: ControlPlane,
        service: TrainerService,
        workers: WorkerGroup,
        event_log: EventLog,
        extra: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self._extra = extra
        """More of this machine's state for its status (memory held, replica lag)."""
        self._machine = machine
        self._plane = plane
        self._service = service
        self._workers = workers
        self._events = event_log

    def report(self, generation: int, **fields: Any) -> None:
        """Publish this machine's status for the root (best effort: etcd may be briefly away)."""
        step, _ = self._service.last_progress()
        record = {
            "generation": generation,
            "at": time.time(),
            "last_step": step,
            "failed_ranks": [],
            **self._extra(),
            **fields,
        }
        try:
            self._plane.report(self._machine, record)
        except CoordinationError as e:
            log.warning("could not report status to etcd: %s", e)

    def failures(self, generation: int, failures: list[WorkerExit]) -> None:
        """Record dead trainers in the events and tell the root."""
        for failure in failures:
            self._events.emit(
                events.WORKER_FAILED,
                generation=generation,
                rank=failure.rank,
                pid=failure.pid,
                exitcode=failure.exitcode,
                description=failure.describe(),
                last_committed=self._service.latest(failure.rank),
                stderr_tail=self._workers.stderr_tail(failure.local_rank),
            )
        log.warning("generation %d: %s", generation, "; ".join(f.describe() for f in failures))
        self.report(
            generation,
            failed_ranks=[f.rank for f in failures],
            failures=[f.describe() for f in failures],
        )

    def hang(
        self, generation: int, ranks: range, started: float, deadlines_s: tuple[float, float]
    ) -> bool:
        """Report a hang if no step completed within the deadline; True if one was reported.

        `deadlines_s`: (between steps, before the generation's first step).
        """
        step, at = self._service.last_progress()
        incident = classify(
            time.monotonic(),
            {self._machine: MemberReport(True, last_step=step, last_step_at=at)},
            deadlines_s[0],
            started,
            startup_deadline_s=deadlines_s[1],
        )
        if incident is None:
            return False
        self._events.emit(
            events.HANG,
            generation=generation,
            reason=incident.reason,
            ranks=list(ranks),
            last_committed=step,
        )
        self.report(generation, failed_ranks=list(ranks), hang=incident.reason)
        return True
