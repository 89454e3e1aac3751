"""Writing one save into the agent's memory: claim a slot, copy, checksum, commit.

Used by `Checkpointer.save()`, on the calling thread (the copy of sync mode) or on its background
thread. Every failure after a slot was claimed tells the agent to forget that slot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemini_ckpt.config import TrainerConfig
from gemini_ckpt.errors import AgentUnavailableError, GeminiError
from gemini_ckpt.faults import FaultPoint
from gemini_ckpt.protocol.manifest import Manifest
from gemini_ckpt.snapshot.agent_client import AgentClient
from gemini_ckpt.snapshot.copier import ChunkCopier
from gemini_ckpt.snapshot.layout import Layout
from gemini_ckpt.snapshot.tree import FlatState
from gemini_ckpt.store.shm import MappedRegion, map_file

log = logging.getLogger(__name__)


@dataclass
class SaveTiming:
    """Timings of one save, in seconds."""

    step: int = 0
    capture_s: float = 0.0
    """Time `save()` spent capturing the state before handing the copy off."""
    wait_s: float = 0.0
    """Time the optimizer step waited for the previous save's background work."""
    copy_s: float = 0.0
    """Duration of the copy (with checksums when overlapped, and in the background then)."""
    checksum_s: float = 0.0
    """Checksumming after the copy (sync mode; in the background, before the commit)."""
    iteration_s: float = 0.0
    """Time since the previous `save()` call."""
    extra: dict[str, float] = field(default_factory=dict)
    skipped: bool = False
    """The agent asked to skip this save (nothing was written)."""
    iteration_start: float = 0.0
    """When the iteration after this save began (`time.monotonic()`; 0: not yet known)."""
    deferred_s: float = 0.0
    """How long the background copy waited for an idle span of the training network."""

    def report(self, mode: str) -> dict[str, Any]:
        """What the agent records with the commit."""
        # Training was blocked for the capture, the wait before the optimizer step and, in sync
        # mode, the copy itself.
        blocking = self.capture_s + self.wait_s + (self.copy_s if mode == "sync" else 0.0)
        return {
            "blocking_s": blocking,
            "copy_s": self.copy_s + self.checksum_s,
            "iteration_s": self.iteration_s,
            **({"deferred_s": self.deferred_s} if self.deferred_s else {}),
            "metrics": self.extra,
            **({"iteration_start": self.iteration_start} if self.iteration_start else {}),
        }


@dataclass
class Session:
    """What a checkpointer holds between `start()` and `close()`."""

    config: TrainerConfig
    client: AgentClient
    copier: ChunkCopier
    jobs: ThreadPoolExecutor
    failpoints: dict[str, int]


@dataclass(frozen=True)
class WrittenSlot:
    """A slot holding a copied state, not yet committed."""

    slot: int
    job: str
    region: MappedRegion
    digests: dict[int, str]


class SlotWriter:
    """Claims slots from the agent and writes states into them; keeps the slots mapped."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._capacity = 0
        self._regions: dict[int, MappedRegion] = {}

    def write(
        self,
        flat: FlatState,
        layout: Layout,
        ready: Any,
        timing: SaveTiming,
        before_copy: Callable[[float | None], None] = lambda _copy_by: None,
    ) -> WrittenSlot | None:
        """Claim a slot, call `before_copy`, copy the state (with checksums when overlapped).

        `before_copy` may hold the copy back (until an idle span of the training network); the
        slot is claimed first so that the agent hears of the iteration's start on time, and
        its grant says by when a held-back copy must be done (`copy_by_s`, passed on; None
        when the agent sets no bound).
        Returns None when the agent says to skip this save (it cannot make it safe right now,
        e.g. etcd is briefly unavailable): training goes on and a later save is kept instead.
        """
        session, step = self._session, timing.step
        client, config = session.client, session.config
        started = time.monotonic()
        if layout.data_nbytes > self._capacity:
            reply = client.request("allocate", rank=config.rank, nbytes=layout.data_nbytes)
            self._capacity = int(reply["capacity"])
        # The next iteration's start, for an interleaving agent's pacer (see `before_copy`).
        start = {"iteration_start": timing.iteration_start} if timing.iteration_start else None
        grant = client.request(
            "begin", rank=config.rank, step=step, **({"timing": start} if start else {})
        )
        if grant.get("skip"):
            log.warning("step %d not checkpointed: %s", step, grant.get("reason"))
            timing.skipped = True
            return None
        copy_by = grant.get("copy_by_s")
        before_copy(float(copy_by) if isinstance(copy_by, (int, float)) else None)
        checksum = config.snapshot_mode == "overlapped"
        try:
            region = self._region(int(grant["slot"]), Path(grant["path"]))
            sources = entry_sources(flat, layout)
            chunks = range(layout.num_chunks)
            # An armed mid-save fault point splits the copy in two and fires in between.
            armed = session.failpoints.get(FaultPoint.MID_SAVE.value) == step
            parts = [chunks[: len(chunks) // 2], chunks[len(chunks) // 2 :]] if armed else [chunks]
            digests: dict[int, str] = {}
            for index, part in enumerate(parts):
                if index == 1:
                    client.request(
                        "failpoint", rank=config.rank, name=FaultPoint.MID_SAVE.value, step=step
                    )
                digests.update(
                    session.copier.copy(
                        layout, sources, region.tensor, part, ready, checksum=checksum
                    )
                )
        except BaseException as e:
            self.abort(step, e)
            raise
        timing.copy_s = time.monotonic() - started - timing.deferred_s
        return WrittenSlot(int(grant["slot"]), str(grant.get("job", "")), region, digests)

    def commit(
        self, flat: FlatState, layout: Layout, written: WrittenSlot, timing: SaveTiming
    ) -> None:
        """Checksum what is not checksummed yet, then make the checkpoint visible."""
        session, step = self._session, timing.step
        config = session.config
        started = time.monotonic()
        try:
            digests = written.digests
            if len(digests) < layout.num_chunks:
                data = written.region.view()[: layout.data_nbytes]
                digests = dict(enumerate(session.copier.digests(layout.chunk_size, data)))
        except BaseException as e:
            self.abort(step, e)
            raise
        timing.checksum_s = time.monotonic() - started
        manifest = Manifest(
            job=written.job,
            rank=config.rank,
            world_size=config.world_size,
            step=step,
            generation=config.generation,
            chunk_size=layout.chunk_size,
            data_nbytes=layout.data_nbytes,
            chunk_digests=tuple(digests[i] for i in range(layout.num_chunks)),
            entries=layout.entries,
            tensor_refs=layout.tensor_refs,
            skeleton=flat.skeleton,
        )
        try:
            session.client.request(
                "commit",
                rank=config.rank,
                slot=written.slot,
                manifest=manifest.to_dict(),
                timing=timing.report(config.snapshot_mode),
            )
        except AgentUnavailableError:
            raise
        except GeminiError as e:
            # Refused (not lost in transit): the slot stays claimed unless it is given back.
            self.abort(step, e)
            raise

    def abort(self, step: int, error: BaseException) -> None:
        """Tell the agent to forget the slot claimed for `step`."""
        self._session.client.request(
            "abort",
            rank=self._session.config.rank,
            step=step,
            reason=f"{type(error).__name__}: {error}",
        )

    def close(self) -> None:
        """Unmap the slots (the agent keeps the memory)."""
        for region in self._regions.values():
            _unmap(region)
        self._regions = {}

    def _region(self, slot: int, path: Path) -> MappedRegion:
        region = self._regions.get(slot)
        if region is None or region.nbytes != self._capacity or region.path != path:
            if region is not None:
                _unmap(region)
            region = self._regions[slot] = map_file(path, self._capacity, writable=True)
            if torch.cuda.is_initialized():
                _pin(region)
        return region


def entry_sources(flat: FlatState, layout: Layout) -> list[torch.Tensor]:
    """One source tensor per stored entry (the first tensor that refers to it)."""
    sources: list[torch.Tensor | None] = [None] * len(layout.entries)
    for tensor, ref in zip(flat.tensors, layout.tensor_refs, strict=True):
        if sources[ref] is None:
            sources[ref] = tensor
    return [s for s in sources if s is not None]


def cuda_ready_event(flat: FlatState) -> Any:
    """An event on the training stream after the state was produced, if any tensor is on CUDA."""
    if not any(t.is_cuda for t in flat.tensors):
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def _unmap(region: MappedRegion) -> None:
    if region.pinned:
        torch.cuda.cudart().cudaHostUnregister(region.tensor.data_ptr())
        region.pinned = False
    region.close()


def _pin(region: MappedRegion) -> None:
    # Page-locks the shared mapping so device-to-host copies into it can run asynchronously.
    result = torch.cuda.cudart().cudaHostRegister(region.tensor.data_ptr(), region.nbytes, 0)
    if int(result) != 0:
        log.warning(
            "cudaHostRegister of %s failed (%s); copies will be synchronous", region.path, result
        )
        return
    region.pinned = True
