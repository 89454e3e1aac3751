"""Retrieval: pull a checkpoint a peer holds into a local store, over parallel connections.

The manifest comes first; then the chunk range is cut into `streams` contiguous parts, each pulled
on its own authenticated connection and thread, received straight into the destination slot and
hashed piece by piece as it lands (while in the CPU's cache). Whatever the store held for the rank
is forgotten first (as `LocalStore.install` does), and the slot is committed only when every chunk
matched the manifest. A copy that fails verification is reported back to the peer (DISCARD), so
the next recovery plan does not pick it again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemini_ckpt.errors import CorruptCheckpointError, GeminiError, ReplicationError
from gemini_ckpt.protocol.manifest import Manifest
from gemini_ckpt.replication import wire
from gemini_ckpt.replication.auth import Credentials
from gemini_ckpt.replication.connection import Timeouts, call, connect
from gemini_ckpt.replication.mapping import SlotMappings, mapped_range
from gemini_ckpt.store.local_store import LocalStore, SlotRef

log = logging.getLogger(__name__)

MAX_STREAMS = 4


def default_streams() -> int:
    """Parallel connections for a fetch: one per two CPUs of this machine, 1 to `MAX_STREAMS`.

    Each stream keeps about a core busy copying and hashing what it receives; streams beyond the
    spare cores only contend. (Measured on 2 cores, both ends on one host: 1 GiB came in 15 %
    slower over 4 streams than over 1.)
    """
    return max(1, min(MAX_STREAMS, (os.cpu_count() or 1) // 2))


class _Rewritten(ReplicationError):
    """The peer's slot was rewritten while it was being sent: the step is gone there."""


@dataclass(frozen=True)
class FetchResult:
    """A checkpoint retrieved from a peer and committed in the local store at `ref`."""

    rank: int
    step: int
    source: str
    """The peer's address, and which of its stores served the copy ("replica" or "own")."""
    nbytes: int
    seconds: float
    streams: int
    ref: SlotRef


@dataclass(frozen=True)
class Holdings:
    """What a peer holds: committed steps per rank, of its replicas and of its own ranks."""

    replicas: dict[int, list[int]]
    own: dict[int, list[int]]


class ReplicaClient:
    """Requests to one peer's replication server; every call opens its own connection(s).

    `mappings`, if given, is a writable `SlotMappings` the caller keeps for the slot files fetches
    land in (an agent's, for its own store): a slot mapped by an earlier fetch is not mapped again.
    Without it each fetch maps the destination and unmaps it after, about 130 ms per GiB here.

    Raises:
        ReplicationError: `endpoint` is not an address or "host:port".
    """

    def __init__(
        self,
        endpoint: wire.Endpoint,
        credentials: Credentials,
        timeouts: Timeouts | None = None,
        mappings: SlotMappings | None = None,
    ) -> None:
        address = wire.parse_address(endpoint)
        self.address = address
        self.where = wire.describe(address)
        self._credentials = credentials
        self._timeouts = timeouts or Timeouts()
        self._mappings = mappings

    def _connect(self) -> socket.socket:
        return connect(self.address, self._credentials, self._timeouts)

    def _request(self, header: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        """One request on a new connection: the reply header and the payload it announced."""
        sock = self._connect()
        try:
            reply = call(sock, self.where, header)
            payload = wire.recv_bytes(sock, wire.payload_size(reply), wire.MAX_MANIFEST)
        except OSError as e:
            raise ReplicationError(f"peer {self.where} broke the connection: {e}") from e
        finally:
            wire.close_quietly(sock)
        return reply, payload

    def holdings(self) -> Holdings:
        """The peer's committed steps per rank.

        Raises:
            ReplicationError: the peer is unreachable, refused, or answered nonsense.
        """
        reply, _ = self._request({"op": "holdings"})
        try:
            return Holdings(_steps(reply.get("replicas")), _steps(reply.get("own")))
        except (TypeError, ValueError, AttributeError) as e:
            raise ReplicationError(f"peer {self.where} sent malformed holdings: {e}") from e

    def manifest(self, rank: int, step: int) -> tuple[Manifest, str]:
        """The manifest of `rank`'s `step` as the peer holds it, and which store holds it.

        Raises:
            ReplicationError: the peer is unreachable, does not hold it, or broke the protocol.
            CorruptCheckpointError: the manifest is invalid or not the one asked for.
        """
        reply, payload = self._request({"op": "manifest", "rank": rank, "step": step})
        manifest = Manifest.from_json(payload)
        if (manifest.job, manifest.rank, manifest.step) != (self._credentials.job, rank, step):
            raise CorruptCheckpointError(
                f"peer {self.where} sent the manifest of job {manifest.job!r} rank "
                f"{manifest.rank} step {manifest.step} for rank {rank} step {step}"
            )
        return manifest, str(reply.get("source"))

    def discard(self, rank: int, step: int) -> bool:
        """Ask the peer to drop its copy of `rank`'s `step` (found corrupt); True if it did.

        Raises:
            ReplicationError: the peer is unreachable or refused.
        """
        reply, _ = self._request({"op": "discard", "rank": rank, "step": step})
        return bool(reply.get("dropped"))

    def fetch(
        self, rank: int, step: int, into: LocalStore, streams: int | None = None
    ) -> FetchResult:
        """Retrieve `rank`'s `step` into `into` over `streams` connections (None: the default).

        See the module docstring for how; `default_streams()` for how many.

        Whatever `into` held for the rank is forgotten first, as `LocalStore.install` does; on
        failure the rank holds nothing there.

        Raises:
            ReplicationError: the peer is unreachable, does not hold the step, or a connection
                broke; the message names the peer.
            CorruptCheckpointError: chunks failed verification (named in the message); the
                peer has been asked to discard its copy.
            StoreError: `into` cannot hold the step (`MemoryBudgetError` when over budget).
        """
        started = time.monotonic()
        manifest, kind = self.manifest(rank, step)
        parts = _split(manifest.num_chunks, max(1, streams or default_streams()))
        path, slot = _begin_install(into, manifest)
        try:
            self._pull(manifest, parts, path)
            # Ordering: every chunk is in place and verified before the manifest commits it.
            into.commit(rank, slot, manifest)
        except GeminiError:
            into.abort_write(rank, step)
            raise
        ref = into.locate(rank, step)
        if ref is None:
            raise ReplicationError(f"rank {rank} step {step} vanished right after its fetch")
        seconds = time.monotonic() - started
        log.info(
            "fetched rank %d step %d (%d bytes) from %s over %d streams in %.3f s",
            rank,
            step,
            manifest.data_nbytes,
            self.where,
            len(parts),
            seconds,
        )
        source = f"{self.where} ({kind})"
        return FetchResult(rank, step, source, manifest.data_nbytes, seconds, len(parts), ref)

    def _pull(self, manifest: Manifest, parts: list[range], path: Path) -> None:
        """Run one stream per part into the slot file `path`; raise once all ended if one failed."""
        errors: list[GeminiError] = []
        bad: list[int] = []
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=self._stream,
                args=(manifest, part, path, (errors, bad, stop)),
                name=f"gemini-fetch-{manifest.rank}-{i}",
                daemon=True,
            )
            for i, part in enumerate(parts)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()  # bounded: every send and receive of a stream has the i/o timeout
        rewritten = [e for e in errors if isinstance(e, _Rewritten)]
        if rewritten:  # bytes that changed under the peer's sender are torn, not corrupt
            raise rewritten[0]
        if bad:
            self._report_corrupt(manifest, sorted(bad))
        if errors:
            raise errors[0]

    def _stream(
        self,
        manifest: Manifest,
        part: range,
        path: Path,
        outcome: tuple[list[GeminiError], list[int], threading.Event],
    ) -> None:
        errors, bad, stop = outcome
        try:
            sock = self._connect()
        except ReplicationError as e:
            errors.append(e)
            stop.set()
            return
        try:
            rank, step = manifest.rank, manifest.step
            request = {"op": "fetch", "rank": rank, "step": step}
            call(sock, self.where, {**request, "first_chunk": part[0], "last_chunk": part[-1]})
            if self._mappings is not None:
                view = self._mappings.view(path, manifest.data_nbytes)
                self._receive(sock, manifest, part, (view, 0), (bad, stop))
                return
            # Each stream maps (and unmaps) only its own part: the pages of all parts get mapped
            # in parallel, while the peer already sends, instead of one after the other first.
            start, end = manifest.chunk_range(part[0])[0], manifest.chunk_range(part[-1])[1]
            with mapped_range(path, start, end, writable=True) as view:
                self._receive(sock, manifest, part, (view, start), (bad, stop))
        except (wire.WireError, OSError) as e:
            errors.append(ReplicationError(f"peer {self.where} broke a fetch stream: {e}"))
            stop.set()
        except GeminiError as e:
            errors.append(e)
            stop.set()
        finally:
            wire.close_quietly(sock)

    def _receive(
        self,
        sock: socket.socket,
        manifest: Manifest,
        part: range,
        into: tuple[memoryview, int],
        progress: tuple[list[int], threading.Event],
    ) -> None:
        """Receive the chunks of `part` into `into` (a view and the byte offset it starts at)."""
        (view, base), (bad, stop) = into, progress
        rank, step = manifest.rank, manifest.step
        for index in part:
            if stop.is_set():
                return
            header = wire.recv_header(sock)
            start, end = manifest.chunk_range(index)
            expected = {"op": "chunk", "rank": rank, "step": step, "index": index}
            if header is None or {key: header.get(key) for key in expected} != expected:
                raise wire.WireError(f"expected chunk {index}, got {str(header)[:200]}")
            if wire.payload_size(header) != end - start:
                raise wire.WireError(f"chunk {index} is not {end - start} bytes: {header}")
            received = wire.recv_hashed_into(sock, view[start - base : end - base])
            if received != manifest.chunk_digests[index]:
                bad.append(index)
        reply = wire.recv_header(sock)
        if reply is not None and reply.get("rewritten"):
            raise _Rewritten(
                f"peer {self.where} rewrote rank {rank} step {step} while sending it, so it "
                "no longer holds that step"
            )
        if reply is None or reply.get("ok") is not True:
            raise ReplicationError(
                f"peer {self.where} ended the fetch of rank {rank} step {step}: {reply}"
            )

    def _report_corrupt(self, manifest: Manifest, bad: list[int]) -> None:
        rank, step = manifest.rank, manifest.step
        try:
            dropped = self.discard(rank, step)
        except ReplicationError as e:
            log.warning(
                "could not ask %s to discard rank %d step %d: %s", self.where, rank, step, e
            )
            dropped = False
        shown = ", ".join(str(i) for i in bad[:20]) + (", ..." if len(bad) > 20 else "")
        raise CorruptCheckpointError(
            f"rank {rank} step {step} from {self.where}: chunk(s) {shown} of "
            f"{manifest.num_chunks} failed verification; the peer "
            f"{'discarded' if dropped else 'was asked to discard'} its copy"
        )


def fetch_replica(
    endpoint: wire.Endpoint,
    credentials: Credentials,
    rank: int,
    step: int,
    into: LocalStore,
    streams: int | None = None,
) -> FetchResult:
    """Retrieve `rank`'s `step` from the peer at `endpoint` into `into`.

    See `ReplicaClient.fetch`, which this is with the default timeouts.
    """
    return ReplicaClient(endpoint, credentials).fetch(rank, step, into, streams)


def _begin_install(into: LocalStore, manifest: Manifest) -> tuple[Path, int]:
    """What `LocalStore.install` does before filling: the rank's old steps go, a write begins.

    Done here with the store's public calls because `install` maps the whole slot in one thread
    (about 90 ms per GiB, plus 45 ms to unmap it) before a byte may arrive; the streams map their
    own parts instead. Returns the slot's file and index.

    Raises:
        MemoryBudgetError: the slots do not fit this machine's budget.
        StoreError: the slots cannot be prepared.
    """
    rank = manifest.rank
    into.allocate(rank, manifest.data_nbytes)
    for held in into.inventory().get(rank, []):
        into.drop(rank, held)
    into.abort_writes(rank)
    grant = into.prepare_write(rank, manifest.step)
    return into.begin_write(rank, grant), grant.slot


def _split(chunks: int, parts: int) -> list[range]:
    """Cut `chunks` into at most `parts` contiguous, non-empty, near-equal ranges."""
    parts = max(1, min(parts, chunks))
    bounds = [chunks * i // parts for i in range(parts + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i] < bounds[i + 1]]


def _steps(raw: Any) -> dict[int, list[int]]:
    return {int(rank): [int(s) for s in steps] for rank, steps in dict(raw or {}).items()}
