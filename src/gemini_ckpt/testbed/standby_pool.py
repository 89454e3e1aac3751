"""The test bed's warm standby agents: K waiting processes, one handed out per lost machine.

A standby counts as ready once it announced itself in etcd (its imports and etcd connection are
done) and its process still runs; otherwise the operator starts a new agent as it would without
standbys. Each standby handed out is replaced at once, so the pool stays full for the next loss.
"""

from __future__ import annotations

import itertools
import logging
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gemini_ckpt.coordination.control import ControlPlane
from gemini_ckpt.errors import CoordinationError

log = logging.getLogger(__name__)

Spawn = Callable[[str], tuple[subprocess.Popen[bytes], Path]]
"""Start standby NAME; its process and the file its output goes to."""


class StandbyPool:
    """`take(machine)` from the operator's thread; `waiting()` when the test bed closes."""

    def __init__(self, plane: ControlPlane, spawn: Spawn, size: int) -> None:
        self._plane = plane
        self._spawn = spawn
        self._names = itertools.count()
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        for _ in range(size):
            self._start()

    def _start(self) -> None:
        name = f"s{next(self._names)}"
        self._waiting[name] = self._spawn(name)

    def take(self, machine: int) -> tuple[str, subprocess.Popen[bytes], Path] | None:
        """Assign a ready standby to `machine` and start another; None if none is ready."""
        with self._lock:
            if not self._waiting:
                return None
            try:
                ready = self._plane.standbys()
            except CoordinationError as e:
                log.warning("cannot list standbys (%s); a new agent is started instead", e)
                return None
            for name, (process, log_path) in sorted(self._waiting.items()):
                if name not in ready or process.poll() is not None:
                    continue
                try:
                    assigned = self._plane.assign_standby(name, machine, {"at": time.time()})
                except CoordinationError as e:
                    log.warning("cannot assign standby %s: %s", name, e)
                    return None
                if not assigned:
                    continue
                del self._waiting[name]
                self._start()
                return name, process, log_path
            return None

    def waiting(self) -> list[subprocess.Popen[bytes]]:
        """The standby processes not handed out."""
        with self._lock:
            return [process for process, _ in self._waiting.values()]
