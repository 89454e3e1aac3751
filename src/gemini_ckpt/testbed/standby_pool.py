"""The test bed's warm standby agents: K waiting processes, one handed out per lost machine.

A standby counts as ready once it announced itself in etcd (its imports and etcd connection are
done) and its process still runs; otherwise the operator starts a new agent as it would without
standbys. Each standby handed out is replaced once the recovery it served is over (every machine
completed a step in that generation, or the job moved on): started at once, the new standby's
imports would compete with the recovering trainers for this host's cores. (On a cluster, where a
standby is a machine of its own, an operator would start it at once.)
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

    def __init__(self, plane: ControlPlane, spawn: Spawn, size: int, poll_s: float = 0.5) -> None:
        self._plane = plane
        self._spawn = spawn
        self._names = itertools.count()
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self._refills: list[int] = []  # generations whose recovery used a standby
        self.started: dict[str, float] = {}
        """When each standby was started (wall clock), handed out or not."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for _ in range(size):
            self._start()
        if size:
            self._thread = threading.Thread(
                target=self._refill_loop, args=(poll_s,), name="gemini-standby-pool", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """Stop refilling (the waiting standbys are the test bed's to stop)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _start(self) -> None:
        name = f"s{next(self._names)}"
        self._waiting[name] = self._spawn(name)
        self.started[name] = time.time()

    def take(
        self, machine: int, generation: int
    ) -> tuple[str, subprocess.Popen[bytes], Path] | None:
        """Assign a ready standby to `machine` for `generation`'s recovery; None if none is ready.

        Another standby is started once that recovery is over.
        """
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
                self._refills.append(generation)
                return name, process, log_path
            return None

    def _refill_loop(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            with self._lock:
                pending = list(self._refills)
            for generation in pending:
                try:
                    over = self._recovered(generation)
                except CoordinationError as e:
                    log.debug("cannot read generation %d's timeline yet: %s", generation, e)
                    continue
                if over:
                    with self._lock:
                        self._refills.remove(generation)
                        if not self._stop.is_set():
                            self._start()

    def _recovered(self, generation: int) -> bool:
        """Every machine completed a step in `generation`, or the job is past it."""
        parts = self._plane.timeline(generation)["parts"]
        firsts = [m for m, part in parts.items() if "first_step_at" in part]
        current = int(self._plane.kv.get(self._plane.key("generation")) or b"0")
        return len(firsts) >= self._plane.machines or current > generation

    def waiting(self) -> list[subprocess.Popen[bytes]]:
        """The standby processes not handed out."""
        with self._lock:
            return [process for process, _ in self._waiting.values()]
