"""The receiving end of a push: a peer's checkpoint lands in this machine's replica store.

One push on one connection:

    peer -> us   {"op": "push", rank, step, generation} + manifest JSON
    us -> peer   {"ok": true}  (slot granted)  or  {"ok": false, "error"}  (refused; nothing sent)
                 or  {"ok": true, "held": true}  (that very checkpoint is held already: done)
    peer -> us   {"op": "chunk", rank, step, index, digest[, offset]} + bytes   (every chunk, in
                 order; whole, or in pieces: `offset` is where a piece starts within its chunk)
    us -> peer   {"ok": true, "ack": index}   (only for a frame that asks with "ack": true)
    peer -> us   {"op": "commit"}  or, at any point,  {"op": "abort", "reason"}
    us -> peer   {"ok": true}  or  {"ok": false, "error"}

Chunks are received straight into the granted slot's mapping and hashed piece by piece as they
land, while the bytes are still in the CPU's cache (a chunk sent in several frames, as a paced
sender fills idle windows, is hashed across them). Each must match both the digest its frame
carries and the manifest's; the slot is committed only after the sender's final "commit", every
chunk verified and the generation unchanged. Anything else aborts the write: the slot was never
visible, and the replica's other slot still holds the previous complete step.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gemini_ckpt.errors import CorruptCheckpointError, GeminiError, MemoryBudgetError
from gemini_ckpt.protocol.manifest import Manifest
from gemini_ckpt.replication import wire
from gemini_ckpt.replication.mapping import SlotMappings
from gemini_ckpt.store.local_store import LocalStore

log = logging.getLogger(__name__)


class PushRefused(GeminiError):
    """A push this server will not accept; the message goes back to the sender."""


@dataclass
class _Write:
    """A push being received: the granted slot, mapped, and the chunks' verdicts so far."""

    manifest: Manifest
    generation: int
    slot: int
    view: memoryview
    rejected: list[str]


class PushReceiver:
    """Receives pushes into `replicas`; `current_generation()` is the job's generation now.

    Thread-safe: each connection's thread calls `handle` for its own pushes.
    """

    def __init__(
        self,
        job: str,
        replicas: LocalStore,
        current_generation: Callable[[], int],
        on_corrupt: Callable[[int, int, str], None] | None = None,
    ) -> None:
        self._on_corrupt = on_corrupt
        """Told (rank, step, why) of each push rejected for chunks that failed verification."""
        self._job = job
        self._replicas = replicas
        self._current_generation = current_generation
        self._lock = threading.Lock()
        self._over_budget: set[int] = set()
        self._mappings = SlotMappings(writable=True)

    def close(self) -> None:
        """Unmap the replica slots (after the last push ended)."""
        self._mappings.close()

    def handle(self, sock: socket.socket, where: str, header: dict[str, Any]) -> None:
        """Receive one push whose header was just read; reply to it.

        Raises:
            WireError: the stream broke (the connection must be closed; the write is aborted).
            OSError: the connection broke or timed out (likewise).
        """
        rank = wire.field(header, "rank", int)
        step = wire.field(header, "step", int)
        manifest_json = wire.recv_bytes(sock, wire.payload_size(header), wire.MAX_MANIFEST)
        try:
            write = self._open(rank, step, wire.field(header, "generation", int), manifest_json)
        except GeminiError as e:
            self._log_refusal(rank, step, where, e)
            wire.send(sock, wire.error_header(str(e)))
            return
        if write is None:
            wire.send(sock, {"ok": True, "held": True})
            return
        committed = False
        try:
            wire.send(sock, {"ok": True})
            committed = self._receive(sock, where, write)
        finally:
            if not committed:
                self._replicas.abort_write(rank, step)

    def _open(self, rank: int, step: int, generation: int, manifest_json: bytes) -> _Write | None:
        """Check the push and grant it a slot, mapped for writing; None if already held."""
        current = self._current_generation()
        if generation != current:
            raise PushRefused(
                f"push of rank {rank} step {step} is from generation {generation}; the job is in "
                f"generation {current}"
            )
        manifest = Manifest.from_json(manifest_json)
        if (manifest.job, manifest.rank, manifest.step) != (self._job, rank, step):
            raise PushRefused(
                f"manifest of job {manifest.job!r} rank {manifest.rank} step {manifest.step} sent "
                f"as job {self._job!r} rank {rank} step {step}"
            )
        held = self._replicas.locate(rank, step)
        if held is not None and held.manifest.chunk_digests == manifest.chunk_digests:
            return None  # a retry, or a sender that lost track after a recovery: nothing to do
        self._replicas.allocate(rank, manifest.data_nbytes)
        grant = self._replicas.prepare_write(rank, step)
        path = self._replicas.begin_write(rank, grant)
        try:
            view = self._mappings.view(path, manifest.data_nbytes)
        except GeminiError:
            self._replicas.abort_write(rank, step)
            raise
        with self._lock:
            self._over_budget.discard(rank)
        return _Write(manifest, generation, grant.slot, view, [])

    def _log_refusal(self, rank: int, step: int, where: str, error: Exception) -> None:
        if isinstance(error, MemoryBudgetError):
            with self._lock:
                first = rank not in self._over_budget
                self._over_budget.add(rank)
            if first:  # once per rank: a peer retries every iteration
                log.error("cannot hold the replica of rank %d from %s: %s", rank, where, error)
            return
        log.warning("refused push of rank %d step %d from %s: %s", rank, step, where, error)

    def _receive(self, sock: socket.socket, where: str, write: _Write) -> bool:
        """Receive the chunks and the sender's verdict; True once the replica is committed."""
        manifest = write.manifest
        for index in range(manifest.num_chunks):
            start, end = manifest.chunk_range(index)
            hasher, got = wire.chunk_hasher(), 0
            while start + got < end:
                header = self._next(sock, where)
                if header.get("op") == "abort":
                    return self._aborted(sock, where, manifest, header)
                size = self._check_chunk_frame(header, manifest, index, (got, end - start))
                if got == 0 and header.get("digest") != manifest.chunk_digests[index]:
                    write.rejected.append(f"{index} (frame digest differs from the manifest's)")
                wire.recv_hashing_into(sock, write.view[start + got : start + got + size], hasher)
                got += size
                if header.get("ack") is True:
                    # A paced sender keeps a bounded number of units in flight (its
                    # sub-buffers); the verdict on the chunk still comes with the commit.
                    wire.send(sock, {"ok": True, "ack": index})
            if hasher.hexdigest() != manifest.chunk_digests[index]:
                write.rejected.append(str(index))
        header = self._next(sock, where)
        if header.get("op") == "abort":
            return self._aborted(sock, where, manifest, header)
        if header.get("op") != "commit":
            raise wire.WireError(f"expected commit or abort, got {str(header)[:200]}")
        return self._commit(sock, where, write)

    @staticmethod
    def _next(sock: socket.socket, where: str) -> dict[str, Any]:
        header = wire.recv_header(sock)
        if header is None:
            raise wire.WireError(f"{where} closed the connection in the middle of a push")
        return header

    @staticmethod
    def _check_chunk_frame(
        header: dict[str, Any], manifest: Manifest, index: int, progress: tuple[int, int]
    ) -> int:
        """Check a chunk frame's identity, offset and size; return its payload's size.

        `progress` is (bytes of the chunk received so far, the chunk's size): the frame must
        continue where the last one ended and must not run past the chunk.
        """
        received, nbytes = progress
        expected = {"op": "chunk", "rank": manifest.rank, "step": manifest.step, "index": index}
        got = {key: header.get(key) for key in expected}
        size = wire.payload_size(header)
        if (
            got != expected
            or header.get("offset", 0) != received
            or not 0 < size <= nbytes - received
        ):
            raise wire.WireError(
                f"expected chunk {index} of rank {manifest.rank} step {manifest.step} from byte "
                f"{received} (up to {nbytes - received} bytes), got {str(header)[:200]}"
            )
        return size

    def _aborted(
        self, sock: socket.socket, where: str, manifest: Manifest, header: dict[str, Any]
    ) -> bool:
        log.info(
            "push of rank %d step %d from %s aborted by the sender: %s",
            manifest.rank,
            manifest.step,
            where,
            str(header.get("reason"))[:200],
        )
        # Ordering: the write is forgotten before the sender hears of it.
        self._replicas.abort_write(manifest.rank, manifest.step)
        wire.send(sock, {"ok": True, "aborted": True})
        return False

    def _commit(self, sock: socket.socket, where: str, write: _Write) -> bool:
        manifest = write.manifest
        generation = self._current_generation()
        problem: GeminiError | None = None
        if write.rejected:
            problem = CorruptCheckpointError(
                f"rank {manifest.rank} step {manifest.step} from {where}: chunk(s) "
                f"{', '.join(write.rejected)} failed verification (corrupted in flight?)"
            )
        elif generation != write.generation:
            problem = PushRefused(f"the job moved to generation {generation} during the push")
        if problem is None:
            # Ordering: every chunk is in the slot and verified before the manifest commits it.
            try:
                self._replicas.commit(manifest.rank, write.slot, manifest)
            except GeminiError as e:
                problem = e
        if problem is not None:
            log.warning("rejected replica: %s", problem)
            if isinstance(problem, CorruptCheckpointError) and self._on_corrupt is not None:
                self._on_corrupt(manifest.rank, manifest.step, str(problem))
            self._replicas.abort_write(manifest.rank, manifest.step)
            wire.send(sock, wire.error_header(str(problem)))
            return False
        log.debug("holding rank %d step %d from %s", manifest.rank, manifest.step, where)
        wire.send(sock, {"ok": True})
        return True
