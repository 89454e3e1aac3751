"""How a paced push goes out: units of at most R/p bytes, each granted link time.

A unit that does not fit what is left of an idle window goes in part, the piece that does (at
least `min_piece_bytes`), and the rest with the next grant: the schedule fills the end of each
span the same way. At most p units are unacknowledged at once (see `interleave/pacer.py` and
docs/decisions/0008).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

from gemini_ckpt.interleave.pacer import LinkPacer
from gemini_ckpt.protocol.manifest import Manifest
from gemini_ckpt.replication import wire
from gemini_ckpt.replication.connection import expect_ok

MIN_PIECE_BYTES = 64 << 10
"""Smallest part of a unit granted on its own: 0.5 ms at 1 gbit."""


@dataclass(frozen=True)
class Pacing:
    """How a push interleaves with training: chunks wait for link time in idle windows.

    Bytes go in units of at most `unit_bytes` (one sub-buffer, R/p), each granted by `pacer`
    before it leaves; at most `window` units (the p sub-buffers) are unacknowledged at once, so 1
    means each unit waits for the peer to have stored the previous.
    `cancelled()` ends a wait for link time (the generation changed or the agent stops).
    A grant smaller than a unit is at least `min_piece_bytes`: smaller pieces would spend more
    of a window on per-frame cost than on bytes.
    """

    pacer: LinkPacer
    unit_bytes: int
    window: int
    cancelled: Callable[[], bool] = lambda: False
    min_piece_bytes: int = MIN_PIECE_BYTES


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


class PieceSender:
    """Sends byte ranges of a checkpoint as chunk frames, a chunk's part as a piece.

    A range may start or end inside a chunk (a paced grant fills what an idle window holds):
    each chunk it overlaps goes as one frame, with `offset` when it does not start at the
    chunk's first byte. The last frame of a range asks for an acknowledgement when `ack`.
    """

    def __init__(
        self, sock: socket.socket, manifest: Manifest, view: memoryview, corrupt_chunk: int | None
    ) -> None:
        self._sock, self._manifest, self._view = sock, manifest, view
        self._corrupt_chunk = corrupt_chunk
        self.sent = 0
        """Bytes sent so far; ranges go in order, without gaps."""

    def send(self, start: int, end: int, ack: bool = False) -> None:
        """Send bytes [start, end) of the checkpoint (`start` must be `sent`)."""
        manifest = self._manifest
        index = start // manifest.chunk_size
        while start < end:
            chunk_start, chunk_end = manifest.chunk_range(index)
            stop = min(end, chunk_end)
            frame: dict[str, object] = {
                "op": "chunk",
                "rank": manifest.rank,
                "step": manifest.step,
                "index": index,
                "digest": manifest.chunk_digests[index],
            }
            if start > chunk_start:
                frame["offset"] = start - chunk_start
            if ack and stop == end:
                frame["ack"] = True
            payload = self._view[start:stop]
            wire.send(
                self._sock, frame, _flipped(payload) if index == self._corrupt_chunk else payload
            )
            self.sent = start = stop
            index += 1


def _flipped(payload: memoryview) -> bytes:
    """A copy of `payload` with one bit flipped in its middle byte (fault injection)."""
    corrupted = bytearray(payload)
    if corrupted:
        corrupted[len(corrupted) // 2] ^= 0x01
    return bytes(corrupted)
