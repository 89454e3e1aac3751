"""Writes every K-th complete checkpoint of this machine's ranks to the persistent tier.

In the background: a step is first copied out of its shared-memory slot into a staging buffer
(a memory copy, during which a trainer's write into that slot waits), then written to storage at
leisure, so training never waits for the disk. A step that is busy when the next one is due is
skipped, never queued behind.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gemini_ckpt.errors import GeminiError
from gemini_ckpt.observability import events
from gemini_ckpt.observability.events import EventLog
from gemini_ckpt.protocol.manifest import Manifest
from gemini_ckpt.store.local_store import LocalStore
from gemini_ckpt.store.persistent import PersistentStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PersistPolicy:
    """When to persist: every `every_steps` steps and/or every `every_s` seconds (0: never)."""

    every_steps: int = 0
    every_s: float = 0.0

    @property
    def enabled(self) -> bool:
        """Whether anything is ever persisted."""
        return self.every_steps > 0 or self.every_s > 0

    def due(self, step: int, now: float, last_at: float | None) -> tuple[bool, str]:
        """Whether `step` should be persisted, and why."""
        if self.every_steps and step % self.every_steps == 0:
            return True, f"step {step} is a multiple of {self.every_steps}"
        if self.every_s and (last_at is None or now - last_at >= self.every_s):
            since = (
                "no step persisted yet"
                if last_at is None
                else f"{now - last_at:.0f} s since the last"
            )
            return True, f"{since} (every {self.every_s:.0f} s)"
        return False, "not due"


class Persister:
    """`start()`, `offer(step)` whenever all local ranks committed a step, `close()`."""

    def __init__(
        self,
        store: LocalStore,
        persistent: PersistentStore,
        ranks: range,
        policy: PersistPolicy,
        event_log: EventLog,
        after_write: Callable[[Manifest, str], None] | None = None,
    ) -> None:
        self._after_write = after_write
        """Told each copy written, with its data file (fault injection damages it there)."""
        self._store = store
        self._persistent = persistent
        self._ranks = ranks
        self._policy = policy
        self._events = event_log
        self._queue: queue.Queue[int | None] = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self._staging = bytearray()
        self._last_at: float | None = None

    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        if self._thread is None and self._policy.enabled:
            self._thread = threading.Thread(target=self._run, name="gemini-persist", daemon=True)
            self._thread.start()

    def offer(self, step: int) -> None:
        """Persist `step` if the policy says so and the writer is free."""
        if self._thread is None:
            return
        due, reason = self._policy.due(step, time.monotonic(), self._last_at)
        if not due:
            return
        try:
            self._queue.put_nowait(step)
        except queue.Full:
            log.info(
                "step %d not persisted (%s): the previous one is still being written", step, reason
            )
            return
        self._last_at = time.monotonic()

    def close(self, timeout_s: float = 60.0) -> None:
        """Finish the step being written, then stop."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while (step := self._queue.get()) is not None:
            started = time.monotonic()
            try:
                written = [rank for rank in self._ranks if self._persist(rank, step)]
                removed = self._persistent.collect()
            except GeminiError as e:
                log.error("persisting step %d failed: %s", step, e)
                self._events.emit(events.PERSIST_FAILED, step=step, error=str(e))
                continue
            self._events.emit(
                events.PERSISTED,
                step=step,
                ranks=written,
                seconds=time.monotonic() - started,
                removed_steps=removed,
            )

    def _persist(self, rank: int, step: int) -> bool:
        with self._store.reading(rank, step) as ref:
            if ref is None:
                log.info("rank %d step %d is no longer in memory; not persisted", rank, step)
                return False
            nbytes = ref.manifest.data_nbytes
            if len(self._staging) < nbytes:
                self._staging = bytearray(nbytes)
            view = memoryview(self._staging)[:nbytes]
            with ref.path.open("rb") as slot:
                slot.readinto(view)
            manifest = ref.manifest
        # Ordering: the slot is free again; the disk write works from the staged copy.
        path = self._persistent.write(manifest, view)
        if self._after_write is not None:
            self._after_write(manifest, path)
        return True
