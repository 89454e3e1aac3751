"""Copy tensors into a slot's data region chunk by chunk, checksumming each chunk while it is hot.

Worker threads each take a contiguous run of chunks. A chunk's pieces are copied with `Tensor.copy_`
(which releases the GIL) and then hashed with xxh3_64 (which also releases it) while the bytes are
still in cache, so the checksum costs little beyond the copy itself. CUDA sources are copied on a
side stream with `non_blocking=True` into the (pinned) region and hashed once their event fires.
A trainer's copy threads run niced (`TrainerConfig.copy_nice`): the snapshot is background work,
and the training threads that overlap it (gloo's collectives above all) must not wait for a core.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import xxhash

from gemini_ckpt.snapshot.layout import Layout
from gemini_ckpt.snapshot.omp import use_one_openmp_thread
from gemini_ckpt.snapshot.priority import lower_thread_priority

# Pieces a copy thread moves before hashing them: small enough to still be in cache when hashed.
PIECE = 1 << 20


def digest(view: memoryview) -> str:
    """The checksum of one chunk, as stored in manifests."""
    return str(xxhash.xxh3_64_hexdigest(view))


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a tensor's bytes (a contiguous copy first if it is strided)."""
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


class ChunkCopier:
    """Copies entries into a region and checksums chunks, over a pool of named worker threads.

    `start()` creates the pool, `close()` joins it; both are idempotent. Not safe for concurrent
    `copy` calls: the checkpointer runs one save job at a time. With `nice` > 0 the workers run at
    that lower CPU priority.
    """

    def __init__(self, threads: int, *, nice: int = 0) -> None:
        self._threads = threads
        self._nice = nice
        self._pool: ThreadPoolExecutor | None = None
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._lock = threading.Lock()

    def start(self) -> ThreadPoolExecutor:
        """Create the worker pool (idempotent) and return it."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                self._threads, thread_name_prefix="gemini-copy", initializer=self._init_worker
            )
        return self._pool

    def _init_worker(self) -> None:
        use_one_openmp_thread()
        if self._nice:
            lower_thread_priority(self._nice)

    def close(self) -> None:
        """Join the worker threads (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def copy(
        self,
        layout: Layout,
        sources: Sequence[torch.Tensor],
        region: torch.Tensor,
        chunks: range,
        ready: torch.cuda.Event | None = None,
        *,
        checksum: bool = True,
    ) -> dict[int, str]:
        """Copy the pieces of `chunks` from `sources` (one per entry) into `region`.

        Returns the chunks' digests, or nothing when `checksum` is False (see `digests`).
        `ready`, for CUDA sources, is an event recorded on the training stream after the state was
        produced; the copies wait for it.
        """
        if not checksum and self._torch_parallel_enough(sources):
            # torch spreads each large copy over its own intra-op threads already: one call per
            # run of an entry, so each parallel region is as large as it can be.
            for entry, src_start, length, dst in _coalesce(layout, chunks):
                src = as_bytes(sources[entry])[src_start : src_start + length]
                region[dst : dst + length].copy_(src)
            return {}
        view = memoryview(region.numpy()) if checksum else None  # type: ignore[arg-type]
        spans = _split(chunks, self._threads)
        pool = self.start()
        futures = [
            pool.submit(self._copy_run, layout, sources, region, view, run, ready) for run in spans
        ]
        digests: dict[int, str] = {}
        for future in futures:
            digests.update(future.result())
        return digests

    def _torch_parallel_enough(self, sources: Sequence[torch.Tensor]) -> bool:
        return torch.get_num_threads() >= self._threads and not any(s.is_cuda for s in sources)

    def digests(self, chunk_size: int, data: memoryview) -> list[str]:
        """The digest of every `chunk_size` chunk of `data`, computed by all copy threads."""
        total = len(data)
        spans = _split(range(-(-total // chunk_size)), self._threads)

        def run(indices: range) -> list[str]:
            return [
                digest(data[i * chunk_size : min((i + 1) * chunk_size, total)]) for i in indices
            ]

        pool = self.start()
        return [d for future in [pool.submit(run, r) for r in spans] for d in future.result()]

    def verify(self, layout_digests: Sequence[str], chunk_size: int, data: memoryview) -> list[int]:
        """Return the indices of chunks of `data` whose checksum differs from `layout_digests`."""
        actual = self.digests(chunk_size, data)
        if len(actual) != len(layout_digests):
            return list(range(max(len(actual), len(layout_digests))))
        return [i for i, (a, b) in enumerate(zip(actual, layout_digests, strict=True)) if a != b]

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        key = threading.get_ident()
        with self._lock:
            if key not in self._streams:
                self._streams[key] = torch.cuda.Stream(device=device)
            return self._streams[key]

    def _copy_run(
        self,
        layout: Layout,
        sources: Sequence[torch.Tensor],
        region: torch.Tensor,
        view: memoryview | None,
        run: range,
        ready: torch.cuda.Event | None,
    ) -> dict[int, str]:
        flat: dict[int, torch.Tensor] = {}
        out: dict[int, str] = {}
        for chunk in run:
            for seg in layout.chunks[chunk]:
                if seg.entry not in flat:
                    flat[seg.entry] = as_bytes(sources[seg.entry])
            digest_ = self._copy_chunk(layout, chunk, flat, region, view, ready)
            if digest_ is not None:
                out[chunk] = digest_
        return out

    def _copy_chunk(
        self,
        layout: Layout,
        chunk: int,
        flat: dict[int, torch.Tensor],
        region: torch.Tensor,
        view: memoryview | None,
        ready: torch.cuda.Event | None,
    ) -> str | None:
        """Copy one chunk's pieces; hash the chunk (bytes in order, padding included) if `view`."""
        start, end = layout.chunk_range(chunk)
        hasher = xxhash.xxh3_64()
        hashed = start
        device_event = None
        # Without checksums there is nothing to keep in cache: copy each segment in one go.
        piece_size = PIECE if view is not None else layout.chunk_size
        for seg in layout.chunks[chunk]:
            for offset in range(0, seg.length, piece_size):
                length = min(piece_size, seg.length - offset)
                dst_start = seg.dst_offset + offset
                dst = region[dst_start : dst_start + length]
                piece = flat[seg.entry][seg.src_start + offset : seg.src_start + offset + length]
                if piece.is_cuda:
                    device_event = self._copy_from_device(dst, piece, ready)
                    continue
                dst.copy_(piece)
                if device_event is None and view is not None:
                    # Hash what was just written while it is still in cache.
                    hasher.update(view[hashed : dst_start + length])
                    hashed = dst_start + length
        if device_event is not None:
            device_event.synchronize()
        if view is None:
            return None
        hasher.update(view[hashed:end])
        return str(hasher.hexdigest())

    def _copy_from_device(
        self, dst: torch.Tensor, piece: torch.Tensor, ready: torch.cuda.Event | None
    ) -> torch.cuda.Event:
        stream = self._stream(piece.device)
        with torch.cuda.stream(stream):
            if ready is not None:
                stream.wait_event(ready)
            dst.copy_(piece, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return event


def _coalesce(layout: Layout, chunks: range) -> list[tuple[int, int, int, int]]:
    """The segments of `chunks` merged where an entry continues across chunk boundaries."""
    runs: list[tuple[int, int, int, int]] = []
    for chunk in chunks:
        for seg in layout.chunks[chunk]:
            if runs:
                entry, start, length, dst = runs[-1]
                if entry == seg.entry and start + length == seg.src_start:
                    runs[-1] = (entry, start, length + seg.length, dst)
                    continue
            runs.append((seg.entry, seg.src_start, seg.length, seg.dst_offset))
    return runs


def _split(chunks: range, parts: int) -> list[range]:
    """Cut a range of chunks into at most `parts` contiguous runs of near-equal length."""
    n = len(chunks)
    parts = max(1, min(parts, n))
    bounds = [chunks.start + (n * i) // parts for i in range(parts + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i] < bounds[i + 1]]
