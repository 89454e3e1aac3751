"""Copy tensors into a slot's data region chunk by chunk, checksumming each chunk while it is hot.

Worker threads each take a contiguous run of chunks. A chunk's pieces are copied with `Tensor.copy_`
(which releases the GIL) and then hashed with xxh3_64 (which also releases it) while the bytes are
still in cache, so the checksum costs little beyond the copy itself. CUDA sources are copied on a
side stream with `non_blocking=True` into the (pinned) region and hashed once their event fires.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import xxhash

from gemini_ckpt.snapshot.layout import Layout


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
    `copy` calls: the checkpointer runs one save job at a time.
    """

    def __init__(self, threads: int) -> None:
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._lock = threading.Lock()

    def start(self) -> ThreadPoolExecutor:
        """Create the worker pool (idempotent) and return it."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="gemini-copy")
        return self._pool

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
    ) -> dict[int, str]:
        """Copy the pieces of `chunks` from `sources` (one per entry) into `region`; return digests.

        `ready`, for CUDA sources, is an event recorded on the training stream after the state was
        produced; the copies wait for it.
        """
        view = memoryview(region.numpy())  # type: ignore[arg-type]
        spans = _split(chunks, self._threads)
        pool = self.start()
        futures = [
            pool.submit(self._copy_run, layout, sources, region, view, run, ready) for run in spans
        ]
        digests: dict[int, str] = {}
        for future in futures:
            digests.update(future.result())
        return digests

    def verify(self, layout_digests: Sequence[str], chunk_size: int, data: memoryview) -> list[int]:
        """Return the indices of chunks of `data` whose checksum differs from `layout_digests`."""
        total = len(data)
        spans = _split(range(len(layout_digests)), self._threads)

        def check(run: range) -> list[int]:
            bad = []
            for i in run:
                chunk = data[i * chunk_size : min((i + 1) * chunk_size, total)]
                if digest(chunk) != layout_digests[i]:
                    bad.append(i)
            return bad

        pool = self.start()
        return sorted(i for f in [pool.submit(check, run) for run in spans] for i in f.result())

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
        view: memoryview,
        run: range,
        ready: torch.cuda.Event | None,
    ) -> dict[int, str]:
        flat: dict[int, torch.Tensor] = {}
        out: dict[int, str] = {}
        for chunk in run:
            cuda_event = None
            for seg in layout.chunks[chunk]:
                src = flat.get(seg.entry)
                if src is None:
                    src = flat[seg.entry] = as_bytes(sources[seg.entry])
                dst = region[seg.dst_offset : seg.dst_offset + seg.length]
                piece = src[seg.src_start : seg.src_start + seg.length]
                if piece.is_cuda:
                    cuda_event = self._copy_from_device(dst, piece, ready)
                else:
                    dst.copy_(piece)
            if cuda_event is not None:
                cuda_event.synchronize()
            start, end = layout.chunk_range(chunk)
            out[chunk] = digest(view[start:end])
        return out

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


def _split(chunks: range, parts: int) -> list[range]:
    """Cut a range of chunks into at most `parts` contiguous runs of near-equal length."""
    n = len(chunks)
    parts = max(1, min(parts, n))
    bounds = [chunks.start + (n * i) // parts for i in range(parts + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i] < bounds[i + 1]]
