"""`Checkpointer`: the three lines a training script adds to checkpoint every iteration into memory.

    ckpt = Checkpointer(model, optimizer, lr_scheduler=sched, extra_state=loader)
    start = ckpt.restore()
    for step in range(start, total):
        ...forward, backward, optimizer.step()...
        ckpt.save(step + 1)

`save()` captures the small state, then copies tensors into the agent's shared memory in the
background while the next forward and backward run; a pre-hook on `optimizer.step()` waits for that
copy before parameters change. The agent owns the memory, so a crash of this process loses at most
the iteration in progress.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemini_ckpt.config import TrainerConfig
from gemini_ckpt.errors import CorruptCheckpointError, SnapshotError
from gemini_ckpt.faults import FaultPoint
from gemini_ckpt.protocol.manifest import Manifest
from gemini_ckpt.snapshot.agent_client import AgentClient
from gemini_ckpt.snapshot.copier import ChunkCopier
from gemini_ckpt.snapshot.layout import Layout, plan_layout, signature
from gemini_ckpt.snapshot.state import Stateful, TrainingState
from gemini_ckpt.snapshot.tree import FlatState, unflatten
from gemini_ckpt.store.shm import MappedRegion, map_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoreInfo:
    """What `restore()` did: the step resumed from and where the state came from."""

    step: int
    source: str
    seconds: float = 0.0
    chunks_verified: int = 0


@dataclass
class SaveTiming:
    """Timings of the most recent save, in seconds."""

    step: int = 0
    capture_s: float = 0.0
    """Time `save()` spent capturing the state before handing the copy off."""
    wait_s: float = 0.0
    """Time the optimizer step waited for the previous save's background copy."""
    copy_s: float = 0.0
    """Duration of the copy (with checksums when overlapped; in the background then)."""
    checksum_s: float = 0.0
    """Checksumming after the copy (sync mode; in the background, before the commit)."""
    iteration_s: float = 0.0
    """Time since the previous `save()` call."""
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Written:
    """A slot holding a copied state, not yet committed."""

    slot: int
    job: str
    region: MappedRegion
    digests: dict[int, str]


@dataclass
class _Session:
    """What exists between `start()` and `close()`."""

    config: TrainerConfig
    client: AgentClient
    copier: ChunkCopier
    jobs: ThreadPoolExecutor
    failpoints: dict[str, int]


class Checkpointer:
    """Per-iteration in-memory checkpoints of one rank, kept by the machine's Gemini agent.

    The constructor only records its arguments; the first `restore()`/`save()` (or `start()`)
    connects to the agent. Use as a context manager or call `close()` at the end.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        *,
        lr_scheduler: Stateful | None = None,
        extra_state: Stateful | None = None,
        config: TrainerConfig | None = None,
    ) -> None:
        optimizers = (
            []
            if optimizer is None
            else ([optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer))
        )
        self._state = TrainingState(model, optimizers, lr_scheduler, extra_state)
        self._given_config = config
        self._session: _Session | None = None
        self._pending: Future[None] | None = None
        self._hooks: list[Any] = []
        self._layout: Layout | None = None
        self._regions: dict[int, MappedRegion] = {}
        self._capacity = 0
        self._last_step: int | None = None
        self._last_call: float | None = None
        self._wait_s = 0.0
        self.restore_info: RestoreInfo | None = None
        self.last_save = SaveTiming()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect to the agent, introduce this rank and hook the optimizers (idempotent)."""
        if self._session is not None:
            return
        config = self._given_config or TrainerConfig.from_env()
        client = AgentClient(config.agent_socket, config.request_timeout_s)
        client.connect()
        hello = client.request(
            "hello", rank=config.rank, pid=os.getpid(), generation=config.generation
        )
        self._session = _Session(
            config=config,
            client=client,
            copier=ChunkCopier(config.copy_threads),
            jobs=ThreadPoolExecutor(1, thread_name_prefix="gemini-save"),
            failpoints={fp["name"]: int(fp["step"]) for fp in hello.get("failpoints", [])},
        )
        self._hooks = [
            opt.register_step_pre_hook(self._before_optimizer_step)
            for opt in self._state.optimizers
        ]

    def close(self) -> None:
        """Wait for the last save, then release the connection, threads and mappings."""
        try:
            self.wait()
        finally:
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
            session, self._session = self._session, None
            if session is not None:
                session.jobs.shutdown(wait=True)
                session.copier.close()
                session.client.close()
            for region in self._regions.values():
                region.close()
            self._regions = {}

    def __enter__(self) -> Checkpointer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- restore ---------------------------------------------------------------------------------

    def restore(self) -> int:
        """Load the state the agent's recovery plan chose; return the step to resume from.

        Returns 0 on a fresh run. Every chunk is verified before anything is loaded.

        Raises:
            CorruptCheckpointError: a chunk fails its checksum (nothing is loaded; the agent is
                told, so the next attempt uses an older step).
            RestoreError: the checkpoint does not fit the model/optimizer given.
        """
        self.start()
        session = self._require()
        client, config = session.client, session.config
        started = time.monotonic()
        reply = client.request("restore", rank=config.rank)
        if reply.get("step") is None:
            self.restore_info = RestoreInfo(0, str(reply.get("source", "none (fresh start)")))
            return 0
        manifest = Manifest.from_dict(reply["manifest"])
        source = str(reply.get("source", "local memory"))
        region = map_file(Path(reply["path"]), manifest.data_nbytes, writable=False)
        try:
            tensors = _verified_tensors(session.copier, manifest, region, source)
        except CorruptCheckpointError as e:
            client.request("report_corrupt", rank=config.rank, step=manifest.step, detail=str(e))
            raise
        finally:
            region.close()
        self._state.load(unflatten(manifest.skeleton, [tensors[i] for i in manifest.tensor_refs]))
        seconds = time.monotonic() - started
        client.request("restored", rank=config.rank, step=manifest.step, seconds=seconds)
        self._last_step = manifest.step
        self.restore_info = RestoreInfo(manifest.step, source, seconds, manifest.num_chunks)
        log.info(
            "rank %d restored step %d from %s in %.3f s",
            config.rank,
            manifest.step,
            source,
            seconds,
        )
        return manifest.step

    # -- save ------------------------------------------------------------------------------------

    def save(self, step: int, *, metrics: Mapping[str, float] | None = None) -> None:
        """Checkpoint the state that now belongs to `step` (call after `optimizer.step()`).

        Overlapped mode returns once the small state is captured; tensor bytes are copied and
        checksummed in the background before the next optimizer step. Sync mode returns once the
        bytes are copied; checksums and the commit follow in the background. Either way the
        checkpoint becomes visible (committed) a little after `save()` returns; `wait()` waits
        for that.

        Raises:
            SnapshotError: `step` does not increase, or the state holds an unsupported value.
            GeminiError: the previous background save failed (raised here or at the next
                optimizer step).
        """
        entered = time.monotonic()
        self.start()
        self.wait()
        session = self._require()
        if self._last_step is not None and step <= self._last_step:
            raise SnapshotError(f"save({step}) after save({self._last_step}): steps must increase")
        overlapped = session.config.snapshot_mode == "overlapped"
        flat = self._state.capture(clone_unstable=overlapped)
        layout = self._layout_for(flat, session.config.chunk_size)
        ready = _cuda_ready_event(flat)
        timing = SaveTiming(
            step=step,
            wait_s=self._wait_s,
            iteration_s=entered - self._last_call if self._last_call else 0.0,
            extra={k: float(v) for k, v in (metrics or {}).items()},
        )
        self._wait_s, self._last_call, self._last_step = 0.0, entered, step
        timing.capture_s = time.monotonic() - entered
        self.last_save = timing
        if overlapped:
            self._pending = session.jobs.submit(
                self._save_job, session, flat, layout, ready, timing
            )
        else:
            # Sync mode: the bytes are copied before save() returns, so the state may change
            # right away; checksums and the commit follow in the background.
            written = self._write(session, flat, layout, ready, timing)
            self._pending = session.jobs.submit(
                self._commit, session, flat, layout, written, timing
            )

    def wait(self) -> None:
        """Block until the background save (if any) is committed; re-raise its failure."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _before_optimizer_step(self, *_: Any) -> None:
        started = time.monotonic()
        self.wait()
        self._wait_s += time.monotonic() - started

    def _layout_for(self, flat: FlatState, chunk_size: int) -> Layout:
        if self._layout is None or self._layout.signature != signature(flat.tensors):
            self._layout = plan_layout(flat.tensors, chunk_size)
        return self._layout

    def _save_job(
        self, session: _Session, flat: FlatState, layout: Layout, ready: Any, timing: SaveTiming
    ) -> None:
        written = self._write(session, flat, layout, ready, timing)
        self._commit(session, flat, layout, written, timing)

    def _write(
        self, session: _Session, flat: FlatState, layout: Layout, ready: Any, timing: SaveTiming
    ) -> _Written:
        """Claim a slot and copy the state into it (with checksums if overlapped)."""
        client, config, step = session.client, session.config, timing.step
        started = time.monotonic()
        if layout.data_nbytes > self._capacity:
            reply = client.request("allocate", rank=config.rank, nbytes=layout.data_nbytes)
            self._capacity = int(reply["capacity"])
        grant = client.request("begin", rank=config.rank, step=step)
        checksum = config.snapshot_mode == "overlapped"
        try:
            region = self._region(int(grant["slot"]), Path(grant["path"]))
            sources = _entry_sources(flat, layout)
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
            self._abort(session, step, e)
            raise
        timing.copy_s = time.monotonic() - started
        return _Written(int(grant["slot"]), str(grant.get("job", "")), region, digests)

    def _commit(
        self,
        session: _Session,
        flat: FlatState,
        layout: Layout,
        written: _Written,
        timing: SaveTiming,
    ) -> None:
        """Checksum what is not checksummed yet, then make the checkpoint visible."""
        config, step = session.config, timing.step
        started = time.monotonic()
        try:
            digests = written.digests
            if len(digests) < layout.num_chunks:
                data = written.region.view()[: layout.data_nbytes]
                digests = dict(enumerate(session.copier.digests(layout.chunk_size, data)))
        except BaseException as e:
            self._abort(session, step, e)
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
        session.client.request(
            "commit",
            rank=config.rank,
            slot=written.slot,
            manifest=manifest.to_dict(),
            timing=_timing_dict(timing, config),
        )

    def _abort(self, session: _Session, step: int, error: BaseException) -> None:
        session.client.request(
            "abort", rank=session.config.rank, step=step, reason=f"{type(error).__name__}: {error}"
        )

    def _region(self, slot: int, path: Path) -> MappedRegion:
        region = self._regions.get(slot)
        if region is None or region.nbytes != self._capacity or region.path != path:
            if region is not None:
                region.close()
            region = self._regions[slot] = map_file(path, self._capacity, writable=True)
            if torch.cuda.is_initialized():
                _pin(region)
        return region

    def _require(self) -> _Session:
        if self._session is None:
            raise SnapshotError("Checkpointer is closed")
        return self._session


def _verified_tensors(
    copier: ChunkCopier, manifest: Manifest, region: MappedRegion, source: str
) -> list[torch.Tensor]:
    """Check every chunk, then copy each stored tensor out of the mapping."""
    data = region.view()[: manifest.data_nbytes]
    bad = copier.verify(manifest.chunk_digests, manifest.chunk_size, data)
    if bad:
        shown = ", ".join(str(i) for i in bad[:8]) + (" ..." if len(bad) > 8 else "")
        raise CorruptCheckpointError(
            f"rank {manifest.rank} step {manifest.step} from {source}: {len(bad)} of "
            f"{manifest.num_chunks} chunks fail their {manifest.checksum_algorithm} checksum "
            f"(chunk {shown}); refusing to load it"
        )
    tensors = []
    for i, entry in enumerate(manifest.entries):
        dtype = getattr(torch, entry.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise CorruptCheckpointError(f"tensor entry {i} has unknown dtype {entry.dtype!r}")
        numel = 1
        for dim in entry.shape:
            numel *= dim
        if numel * dtype.itemsize != entry.nbytes:
            raise CorruptCheckpointError(
                f"tensor entry {i}: shape {entry.shape} of {entry.dtype} "
                f"is not {entry.nbytes} bytes"
            )
        raw = region.tensor[entry.offset : entry.offset + entry.nbytes]
        tensors.append(raw.view(dtype).reshape(entry.shape).clone())
    return tensors


def _entry_sources(flat: FlatState, layout: Layout) -> list[torch.Tensor]:
    sources: list[torch.Tensor | None] = [None] * len(layout.entries)
    for tensor, ref in zip(flat.tensors, layout.tensor_refs, strict=False):
        if sources[ref] is None:
            sources[ref] = tensor
    return [s for s in sources if s is not None]


def _cuda_ready_event(flat: FlatState) -> Any:
    if not any(t.is_cuda for t in flat.tensors):
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def _pin(region: MappedRegion) -> None:
    # Page-locks the shared mapping so device-to-host copies into it can run asynchronously.
    result = torch.cuda.cudart().cudaHostRegister(region.tensor.data_ptr(), region.nbytes, 0)
    if int(result) != 0:
        log.warning(
            "cudaHostRegister of %s failed (%s); copies will be synchronous", region.path, result
        )


def _timing_dict(timing: SaveTiming, config: TrainerConfig) -> dict[str, Any]:
    # Training was blocked for the capture, the wait before the optimizer step and, in sync mode,
    # the copy itself.
    blocking = timing.capture_s + timing.wait_s
    if config.snapshot_mode == "sync":
        blocking += timing.copy_s
    return {
        "blocking_s": blocking,
        "copy_s": timing.copy_s,
        "iteration_s": timing.iteration_s,
        "metrics": timing.extra,
    }
