"""Executes the faults aimed at this machine's ranks, with real signals, once each.

`kill-worker` sends SIGKILL; `hang` sends SIGSTOP (the process stays, but makes no progress).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from gemini_ckpt.faults import MACHINE_KINDS, FaultPoint, ResolvedFault
from gemini_ckpt.observability import events
from gemini_ckpt.observability.events import EventLog

log = logging.getLogger(__name__)


class FaultInjector:
    """Decides when a fault fires; every fault fires at most once per job.

    `claim(fault)` is asked before a fault fires and must return True only once per job, also
    across agents (a replacement machine gets the same faults as the one it replaces).
    """

    def __init__(
        self,
        faults: Sequence[ResolvedFault],
        event_log: EventLog,
        claim: Callable[[ResolvedFault], bool] = lambda _: True,
    ) -> None:
        self._pending = list(faults)
        self._events = event_log
        self._claim = claim
        self._lock = threading.Lock()

    def machine_fault_due(self, step: int, is_root: bool) -> ResolvedFault | None:
        """The machine fault to execute now that this machine completed `step`, if any."""
        with self._lock:
            for fault in self._pending:
                if fault.kind not in MACHINE_KINDS or step < fault.step:
                    continue
                if fault.kind == "kill-root" and not is_root:
                    continue
                self._pending.remove(fault)
                return fault if self._claim(fault) else None
        return None

    def failpoints(self, rank: int) -> list[dict[str, object]]:
        """Fault points the trainer of `rank` must report when it reaches them."""
        with self._lock:
            return [
                {"name": f.point.value, "step": f.step}
                for f in self._pending
                if f.rank == rank
                and f.point is not FaultPoint.AFTER_COMMIT
                and f.kind not in MACHINE_KINDS
            ]

    def _take(self, rank: int, step: int, point: FaultPoint) -> ResolvedFault | None:
        with self._lock:
            for fault in self._pending:
                if (fault.rank, fault.step, fault.point) == (rank, step, point):
                    self._pending.remove(fault)
                    return fault if self._claim(fault) else None
        return None

    def after_commit(self, rank: int, step: int, pid: int | None) -> bool:
        """Kill `rank` if a fault is due now that it committed `step`; True if it was killed."""
        return self._fire(self._take(rank, step, FaultPoint.AFTER_COMMIT), pid)

    def at_failpoint(self, rank: int, name: str, step: int, pid: int | None) -> bool:
        """Kill `rank`, which reports it reached fault point `name` at `step`, if that is due."""
        try:
            point = FaultPoint(name)
        except ValueError:
            return False
        return self._fire(self._take(rank, step, point), pid)

    def _fire(self, fault: ResolvedFault | None, pid: int | None) -> bool:
        if fault is None or pid is None:
            return False
        sig = signal.SIGSTOP if fault.kind == "hang" else signal.SIGKILL
        log.warning(
            "fault %s: sending %s to rank %d (pid %d)", fault.name, sig.name, fault.rank, pid
        )
        self._events.emit(
            events.FAULT_INJECTED,
            fault=fault.name,
            rank=fault.rank,
            step=fault.step,
            point=fault.point.value,
            pid=pid,
            signal=sig.name,
        )
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True


def kill_machine(pids: list[int], shm_dir: Path) -> None:
    """Take this whole machine down at once: trainers, shared memory, and the agent itself."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(shm_dir, ignore_errors=True)
    os.kill(os.getpid(), signal.SIGKILL)
