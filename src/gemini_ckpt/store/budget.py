"""One machine's checkpoint memory budget, shared by its own ranks' slots and the replicas it holds.

Both kinds of slots live in the same /dev/shm and count against the same `--memory-limit`, so the
stores that hold them reserve through one `MemoryBudget`. A holder is a label such as
"own rank 3" or "replica rank 5"; its reservation is replaced, never added to.

With m copies of every checkpoint, each machine will also hold m - 1 peers' shards, about as
large as its own in a data-parallel job. The budget checks that when the trainers first size their
slots, so a too-large m is an error at start-up rather than replicas refused later.
"""

from __future__ import annotations

import threading

from gemini_ckpt.config import format_size
from gemini_ckpt.errors import MemoryBudgetError


class MemoryBudget:
    """Bytes reserved per holder against a fixed limit; thread-safe."""

    def __init__(self, limit: int, copies: int = 1) -> None:
        self.limit = limit
        self.copies = copies
        """m: each own byte is expected to come with m - 1 replica bytes from peers."""
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def reserve(self, holder: str, nbytes: int, what: str) -> None:
        """Set `holder`'s reservation to `nbytes` (replacing what it held).

        Raises:
            MemoryBudgetError: the other holders plus `nbytes` exceed the limit; `what` says what
                was asked for, in the error.
        """
        with self._lock:
            others = {h: n for h, n in self._held.items() if h != holder}
            if sum(others.values()) + nbytes > self.limit:
                raise MemoryBudgetError(
                    f"{what}; this machine's checkpoint memory budget is {format_size(self.limit)}"
                    f" and {_describe(others)} is already held "
                    "(raise --memory-limit, lower --replicas or shrink the state)"
                )
            own = nbytes + sum(n for h, n in others.items() if h.startswith("own"))
            if holder.startswith("own") and own * self.copies > self.limit:
                raise MemoryBudgetError(
                    f"{what}; with --replicas {self.copies} this machine also holds "
                    f"{self.copies - 1} peer cop{'y' if self.copies == 2 else 'ies'} of about as "
                    f"much: {format_size(own * self.copies)} in all, over its checkpoint memory "
                    f"budget of {format_size(self.limit)} (raise --memory-limit, lower --replicas "
                    "or shrink the state)"
                )
            self._held[holder] = nbytes

    def release(self, holder: str) -> None:
        """Forget `holder`'s reservation."""
        with self._lock:
            self._held.pop(holder, None)

    def held(self) -> dict[str, int]:
        """Reserved bytes per holder."""
        with self._lock:
            return dict(self._held)

    def reserved(self) -> int:
        """Reserved bytes in total."""
        with self._lock:
            return sum(self._held.values())


def _describe(held: dict[str, int]) -> str:
    if not held:
        return format_size(0)
    own = sum(n for h, n in held.items() if h.startswith("own"))
    replicas = sum(held.values()) - own
    if not replicas:
        return f"{format_size(own)} (this machine's other ranks)"
    total = format_size(own + replicas)
    return f"{total} ({format_size(own)} own, {format_size(replicas)} replicas)"
