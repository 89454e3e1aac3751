"""How a paced push goes out: units of at most R/p bytes, each granted link time.

At most p units are unacknowledged at once (see `interleave/pacer.py` and docs/decisions/0008).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

from gemini_ckpt.interleave.pacer import LinkPacer
from gemini_ckpt.protocol.manifest import Manifest
from gemini_ckpt.replication.connection import expect_ok


@dataclass(frozen=True)
class Pacing:
    """How a push interleaves with training: chunks wait for link time in idle windows.

    Chunks go in units of at most `unit_bytes` (one sub-buffer, R/p; at least one chunk), each
    granted by `pacer` before it leaves; at most `window` units (the p sub-buffers) are
    unacknowledged at once, so 1 means each unit waits for the peer to have stored the previous.
    `cancelled()` ends a wait for link time (the generation changed or the agent stops).
    """

    pacer: LinkPacer
    unit_bytes: int
    window: int
    cancelled: Callable[[], bool] = lambda: False


class Acks:
    """The units sent and not yet acknowledged; at most `window` (0: no acknowledgements)."""

    def __init__(self, sock: socket.socket, where: str, window: int) -> None:
        self._sock, self._where, self._window = sock, where, window
        self._outstanding = 0

    def sent(self) -> None:
        """A unit left; wait for the oldest acknowledgement while the window is full."""
        if self._window <= 0:
            return
        self._outstanding += 1
        while self._outstanding >= self._window:
            self._receive()

    def drain(self) -> None:
        """Wait for every outstanding acknowledgement (before a commit or an abort)."""
        while self._outstanding > 0:
            self._receive()

    def _receive(self) -> None:
        expect_ok(self._sock, self._where, "a chunk")
        self._outstanding -= 1


def units(manifest: Manifest, unit_bytes: int) -> list[list[int]]:
    """Chunk indices grouped into units of at most `unit_bytes` (at least one chunk each)."""
    units: list[list[int]] = []
    size = 0
    for index in range(manifest.num_chunks):
        start, end = manifest.chunk_range(index)
        if units and unit_bytes > 0 and size + (end - start) <= unit_bytes:
            units[-1].append(index)
            size += end - start
        else:
            units.append([index])
            size = end - start
    return units


def unit_bytes(manifest: Manifest, unit: list[int]) -> int:
    """Bytes of the chunks of `unit` (consecutive chunk indices)."""
    return manifest.chunk_range(unit[-1])[1] - manifest.chunk_range(unit[0])[0]
