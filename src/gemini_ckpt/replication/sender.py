"""Sending a committed checkpoint to a placement peer, chunk by chunk from its shared memory.

The sender never holds the source slot (that would make a trainer's next `save()` wait for the
network). It reads the slot as it is and asks `LocalStore.unchanged` after every chunk; once the
slot has been rewritten, the bytes already sent may be torn, so it sends ABORT and the peer keeps
the replica it had. A paced push (interleaving) may last several iterations, longer than a slot
stays untouched, so it first copies the slot into the link's staging buffer, checks the slot once,
and sends the copy. The peer commits only on the sender's final COMMIT, which follows the last
check (see `receiver.py` for the exchange).

A `PeerLink` keeps one authenticated connection per peer across iterations and reconnects with
backoff: a peer that is down costs a push at most the connect timeout, and while backing off
nothing at all. Every outcome is a `PushResult`; a push never raises for a peer's sake.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from dataclasses import dataclass
from enum import Enum
from types import TracebackType

from gemini_ckpt.errors import ConfigError, GeminiError, ReplicationError
from gemini_ckpt.replication import wire
from gemini_ckpt.replication.auth import AuthenticationError, Credentials
from gemini_ckpt.replication.connection import Timeouts, call, connect, expect_ok
from gemini_ckpt.replication.mapping import SlotMappings
from gemini_ckpt.replication.pacing import Acks, Pacing, PieceSender
from gemini_ckpt.store.local_store import LocalStore, SlotRef

log = logging.getLogger(__name__)


class PushStatus(str, Enum):
    """How a push ended."""

    REPLICATED = "replicated"
    """The peer verified and committed the replica."""
    SKIPPED = "skipped"
    """The source slot was overwritten before or during the push; the peer keeps what it had."""
    REFUSED = "refused"
    """The peer said no (generation, memory budget, step order, a chunk failed verification,
    authentication); the reason says which."""
    UNREACHABLE = "unreachable"
    """No connection to the peer, or it broke mid-push."""


@dataclass(frozen=True)
class PushResult:
    """The outcome of one push of `rank`'s `step` to `peer`."""

    status: PushStatus
    rank: int
    step: int
    peer: str
    reason: str = ""
    nbytes: int = 0
    """Checkpoint bytes sent (all of them when replicated)."""
    seconds: float = 0.0
    paced_s: float = 0.0
    """Of `seconds`, the time spent waiting for idle link time (with pacing)."""

    @property
    def ok(self) -> bool:
        """Whether the peer now holds the replica."""
        return self.status is PushStatus.REPLICATED

    @property
    def skipped(self) -> bool:
        """Whether there was nothing to send: the source slot was overwritten (not a failure)."""
        return self.status is PushStatus.SKIPPED

    def describe(self) -> str:
        """One line for logs."""
        what = f"rank {self.rank} step {self.step} -> {self.peer}: {self.status.value}"
        return f"{what} ({self.reason})" if self.reason else what


@dataclass(frozen=True)
class Backoff:
    """Waits between reconnection attempts to a peer that is down: doubling, up to `max_s`.

    Raises:
        ConfigError: the waits are not positive or `max_s` is below `first_s`.
    """

    first_s: float = 0.2
    max_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.max_s:
            raise ConfigError(f"backoff of {self.first_s} s up to {self.max_s} s is not valid")


class PeerLink:
    """A persistent authenticated connection to one peer's replication server.

    Pushes through one link run one at a time (a lock); use one link per peer. `close()` may be
    called from another thread and interrupts a push in progress. A context manager.
    """

    def __init__(
        self,
        endpoint: wire.Endpoint,
        credentials: Credentials,
        timeouts: Timeouts | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.address = wire.parse_address(endpoint)
        self.where = wire.describe(self.address)
        self._credentials = credentials
        self._timeouts = timeouts or Timeouts()
        self._backoff = backoff or Backoff()
        self._sock: socket.socket | None = None
        self._delay = 0.0
        self._retry_at = 0.0
        self._last_error = ""
        self._lock = threading.Lock()
        self._closed = False
        self._mappings = SlotMappings(writable=False)
        self._paced_s = 0.0
        self._staging = bytearray()

    def close(self) -> None:
        """Close the connection; later pushes report the link closed."""
        self._closed = True
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._drop()
            self._mappings.close()

    def __enter__(self) -> PeerLink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def push(
        self,
        store: LocalStore,
        ref: SlotRef,
        generation: int,
        corrupt_chunk: int | None = None,
        pacing: Pacing | None = None,
    ) -> PushResult:
        """Send `ref`'s committed checkpoint, read from `store`'s shared memory, to the peer.

        `generation` is the job's generation the push belongs to (the peer refuses any other).
        `corrupt_chunk` is a fault-injection hook: that chunk's bytes get one bit flipped after
        its digest was taken, so the peer must reject the push. Never raises for the peer's
        sake: every outcome is a `PushResult`. Blocks for at most the connect timeout when the
        link must reconnect, not at all while backing off, and otherwise for as long as the
        bytes take (each send or receive bounded by the i/o timeout) and, with `pacing`, the
        waits for idle link time.
        """
        started = time.monotonic()
        with self._lock:
            self._paced_s = 0.0
            outcome = self._push(store, ref, generation, corrupt_chunk, pacing)
        status, reason, sent = outcome
        result = PushResult(
            status,
            ref.rank,
            ref.manifest.step,
            self.where,
            reason,
            sent,
            time.monotonic() - started,
            self._paced_s,
        )
        # The caller logs failures when they start and end; per push is too often for a warning.
        log.debug("push: %s", result.describe())
        return result

    def _push(
        self,
        store: LocalStore,
        ref: SlotRef,
        generation: int,
        corrupt_chunk: int | None,
        pacing: Pacing | None,
    ) -> tuple[PushStatus, str, int]:
        try:
            sock = self._connection()
        except AuthenticationError as e:
            return PushStatus.REFUSED, str(e), 0
        except ReplicationError as e:
            return PushStatus.UNREACHABLE, str(e), 0
        progress = [0]
        try:
            return self._send(sock, store, ref, (generation, corrupt_chunk), pacing, progress)
        except (wire.WireError, OSError) as e:
            self._drop()
            reason = f"connection to {self.where} broke: {e or type(e).__name__}"
            return PushStatus.UNREACHABLE, reason, progress[0]
        except ReplicationError as e:
            return PushStatus.REFUSED, str(e), progress[0]
        except GeminiError as e:  # the source slot's file is gone (its store closed)
            return PushStatus.SKIPPED, str(e), progress[0]

    def _send(
        self,
        sock: socket.socket,
        store: LocalStore,
        ref: SlotRef,
        push: tuple[int, int | None],
        pacing: Pacing | None,
        progress: list[int],
    ) -> tuple[PushStatus, str, int]:
        generation, corrupt_chunk = push
        manifest = ref.manifest
        if not store.unchanged(ref):
            return PushStatus.SKIPPED, "the source slot was overwritten before the push", 0
        view = self._mappings.view(ref.path, manifest.data_nbytes)
        if pacing is not None:
            # A paced push may take several iterations, longer than the trainer leaves a slot
            # alone (two saves): it sends a private copy, checked against the slot once.
            view = self._stage(view, manifest.data_nbytes)
            if not store.unchanged(ref):
                return PushStatus.SKIPPED, "the source slot was overwritten while staged", 0
        head = {"op": "push", "rank": ref.rank, "step": manifest.step}
        reply = call(
            sock, self.where, {**head, "generation": generation}, manifest.to_json().encode()
        )
        if reply.get("held"):
            return PushStatus.REPLICATED, "the peer already held it", 0
        acks = Acks(sock, self.where, pacing.window if pacing else 0)
        pieces = PieceSender(sock, manifest, view, corrupt_chunk)
        if pacing is None:
            for index in range(manifest.num_chunks):
                pieces.send(*manifest.chunk_range(index))
                progress[0] = pieces.sent
                if not store.unchanged(ref):
                    reason = f"the source slot was overwritten after chunk {index}"
                    return self._abort(sock, acks, reason, progress)
        while pacing is not None and pieces.sent < manifest.data_nbytes:
            # One sub-buffer (R/p bytes) at a time, or the part of it that fits an idle window.
            want = min(pacing.unit_bytes, manifest.data_nbytes - pieces.sent)
            asked = time.monotonic()
            granted = pacing.pacer.acquire(
                want, pacing.cancelled, min_bytes=min(want, pacing.min_piece_bytes)
            )
            self._paced_s += time.monotonic() - asked
            if not granted:
                return self._abort(sock, acks, "the push was cancelled", progress)
            pieces.send(pieces.sent, pieces.sent + granted, ack=True)
            progress[0] = pieces.sent
            acks.sent()
        acks.drain()
        call(sock, self.where, {"op": "commit"})
        return PushStatus.REPLICATED, "", progress[0]

    def _stage(self, view: memoryview, nbytes: int) -> memoryview:
        """`view`'s bytes copied into this link's staging buffer (grown as needed, then kept)."""
        if len(self._staging) < nbytes:
            self._staging = bytearray(nbytes)
        staged = memoryview(self._staging)[:nbytes]
        staged[:] = view[:nbytes]
        return staged

    def _abort(
        self, sock: socket.socket, acks: Acks, reason: str, progress: list[int]
    ) -> tuple[PushStatus, str, int]:
        acks.drain()
        wire.send(sock, {"op": "abort", "reason": reason})
        expect_ok(sock, self.where, "abort")
        return PushStatus.SKIPPED, reason, progress[0]

    def _connection(self) -> socket.socket:
        """The open connection, or a new one unless backing off.

        Raises:
            ReplicationError: the link is closed, backing off, or the connection failed.
        """
        if self._closed:
            raise ReplicationError(f"the link to {self.where} is closed")
        if self._sock is not None and not _stale(self._sock):
            return self._sock
        self._drop()
        now = time.monotonic()
        if now < self._retry_at:
            raise ReplicationError(f"{self._last_error} (next try in {self._retry_at - now:.1f} s)")
        try:
            self._sock = connect(self.address, self._credentials, self._timeouts)
        except ReplicationError as e:
            self._delay = min(max(2 * self._delay, self._backoff.first_s), self._backoff.max_s)
            self._retry_at = time.monotonic() + self._delay
            if not self._last_error:  # log the change of state, not every retry
                log.warning("replication peer %s is unreachable: %s", self.where, e)
            self._last_error = str(e)
            raise
        if self._last_error:
            log.info("replication peer %s is reachable again", self.where)
        self._delay, self._retry_at, self._last_error = 0.0, 0.0, ""
        return self._sock

    def _drop(self) -> None:
        if self._sock is not None:
            wire.close_quietly(self._sock)
            self._sock = None


def push_replica(
    link: PeerLink,
    store: LocalStore,
    ref: SlotRef,
    generation: int,
    corrupt_chunk: int | None = None,
) -> PushResult:
    """Push `ref`'s checkpoint from `store` through `link` (see `PeerLink.push`).

    For a one-off push: `with PeerLink(endpoint, credentials) as link: push_replica(link, ...)`.
    """
    return link.push(store, ref, generation, corrupt_chunk)


def _stale(sock: socket.socket) -> bool:
    """Whether an idle connection was closed by the peer (a server never speaks first)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
