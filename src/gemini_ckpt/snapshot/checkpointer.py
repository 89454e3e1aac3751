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

Once the collectives are profiled (interleaving on), the background copy waits for the first idle
span of the next iteration that holds it: started at once, its burst of CPU and memory traffic
would land on the iteration's first collective, which every rank waits for.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from gemini_ckpt.config import TrainerConfig
from gemini_ckpt.errors import CorruptCheckpointError, SnapshotError
from gemini_ckpt.interleave.profile import IdleProfile
from gemini_ckpt.protocol.manifest import Manifest
from gemini_ckpt.snapshot.agent_client import AgentClient
from gemini_ckpt.snapshot.copier import ChunkCopier
from gemini_ckpt.snapshot.layout import Layout, plan_layout, signature
from gemini_ckpt.snapshot.profiler import IterationProfiler, hook_ddp, install_collective_hooks
from gemini_ckpt.snapshot.reader import verified_tensors
from gemini_ckpt.snapshot.state import SnapshotSource, Stateful, TrainingState
from gemini_ckpt.snapshot.tree import FlatState, unflatten
from gemini_ckpt.snapshot.writer import SaveTiming, Session, SlotWriter, cuda_ready_event
from gemini_ckpt.store.shm import map_file

log = logging.getLogger(__name__)

_C = TypeVar("_C", bound="StateCheckpointer")


@dataclass(frozen=True)
class RestoreInfo:
    """What `restore()` did: the step resumed from and where the state came from."""

    step: int
    source: str
    seconds: float = 0.0
    chunks_verified: int = 0


class StateCheckpointer:
    """Per-iteration in-memory checkpoints of one rank's `SnapshotSource`, kept by the agent.

    The base of `Checkpointer` and of the framework integrations (`gemini_ckpt.integrations`),
    which differ only in the state they capture and load. The constructor only records its
    arguments; the first `restore()`/`save()` (or `start()`) connects to the agent. Use as a
    context manager or call `close()` at the end.
    """

    def __init__(self, state: SnapshotSource, *, config: TrainerConfig | None = None) -> None:
        self._state = state
        self._given_config = config
        self._session: Session | None = None
        self._writer: SlotWriter | None = None
        self._pending: Future[None] | None = None
        self._hooks: list[Any] = []
        self._layout: Layout | None = None
        self._last_step: int | None = None
        self._last_call: float | None = None
        self._wait_s = 0.0
        self._profiler: IterationProfiler | None = None
        self._idle: IdleProfile | None = None
        self._deferral = _Deferral(0.0)
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
        self._session = Session(
            config=config,
            client=client,
            copier=ChunkCopier(config.copy_threads, nice=config.copy_nice),
            jobs=ThreadPoolExecutor(1, thread_name_prefix="gemini-save"),
            failpoints={fp["name"]: int(fp["step"]) for fp in hello.get("failpoints", [])},
        )
        self._writer = SlotWriter(self._session)
        if config.profile is not None:
            # The agent interleaves replication into the network's idle time: it needs to know
            # when that is. Hooked before the first iteration, so every generation is timed alike.
            hook_ddp(getattr(self._state, "model", None))
            self._profiler = IterationProfiler(
                install_collective_hooks(),
                config.profile.iterations,
                config.profile.warmup,
                config.profile.min_span_s,
                config.profile.drift,
            )
        self._hooks = [
            opt.register_step_pre_hook(self._before_optimizer_step)
            for opt in self._state.hooked_optimizers()
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
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def __enter__(self: _C) -> _C:
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
        step = int(reply["step"])
        source = str(reply.get("source", "local memory"))
        try:
            manifest = Manifest.from_dict(reply["manifest"])
            region = map_file(Path(reply["path"]), manifest.data_nbytes, writable=False)
            try:
                tensors = verified_tensors(session.copier, manifest, region, source)
            finally:
                region.close()
            tree = unflatten(manifest.skeleton, [tensors[i] for i in manifest.tensor_refs])
        except CorruptCheckpointError as e:
            # Told, the agent drops this copy, so the next attempt restores from another one.
            client.request("report_corrupt", rank=config.rank, step=step, detail=str(e))
            raise
        self._state.load(tree)
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
        session, writer = self._require(), self._writer
        if writer is None:
            raise SnapshotError("Checkpointer is closed")
        if self._last_step is not None and step <= self._last_step:
            raise SnapshotError(f"save({step}) after save({self._last_step}): steps must increase")
        overlapped = session.config.snapshot_mode == "overlapped"
        flat = self._state.capture(clone_unstable=overlapped)
        layout = self._layout_for(flat, session.config.chunk_size)
        ready = cuda_ready_event(flat)
        timing = SaveTiming(
            step=step,
            wait_s=self._wait_s,
            iteration_s=entered - self._last_call if self._last_call else 0.0,
            extra={k: float(v) for k, v in (metrics or {}).items()},
        )
        self._wait_s, self._last_call, self._last_step = 0.0, entered, step
        timing.capture_s = time.monotonic() - entered
        previous, self.last_save = self.last_save, timing
        if overlapped:
            self._next_iteration(session, timing)
            deferral = _Deferral(timing.iteration_start, self._idle, previous.copy_s)
            self._deferral = deferral
            self._pending = session.jobs.submit(
                _save_job, writer, flat, layout, ready, timing, deferral
            )
        else:
            # Sync mode: the bytes are copied before save() returns, so the state may change
            # right away; checksums and the commit follow in the background.
            written = writer.write(flat, layout, ready, timing)
            self._next_iteration(session, timing)
            if written is not None:
                self._pending = session.jobs.submit(writer.commit, flat, layout, written, timing)

    def _next_iteration(self, session: Session, timing: SaveTiming) -> None:
        """The next iteration starts now: the profiler and the agent's sender pace by it."""
        now = time.monotonic()
        # Read by the background commit, which carries it to the agent.
        timing.iteration_start = now
        if self._profiler is None:
            return
        report = self._profiler.mark(now)
        if report is not None:
            self._idle = report.profile
            session.client.request("profile", rank=session.config.rank, profile=report.to_dict())

    def wait_replicated(self, step: int, timeout_s: float = 60.0) -> bool:
        """Block until every placement peer holds `step` of this machine's ranks (or newer).

        For blocking checkpointing, where training must not go on before its state is safe on
        other machines. Returns False after `timeout_s`, or at once when replication is off.
        """
        self.wait()
        session = self._require()
        reply = session.client.request(
            "replicated", rank=session.config.rank, step=step, timeout_s=timeout_s
        )
        return bool(reply.get("replicated"))

    def wait(self) -> None:
        """Block until the background save (if any) is committed; re-raise its failure."""
        pending, self._pending = self._pending, None
        self._deferral.go.set()  # a deferred copy starts now: the caller needs it done
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

    def _require(self) -> Session:
        if self._session is None:
            raise SnapshotError("Checkpointer is closed")
        return self._session


class Checkpointer(StateCheckpointer):
    """Per-iteration in-memory checkpoints of a model, its optimizers and the rest of the state.

    `optimizer` may be one optimizer or several; `lr_scheduler` and `extra_state` are anything with
    `state_dict()`/`load_state_dict()`. RNG states are captured and restored automatically.
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
        super().__init__(TrainingState(model, optimizers, lr_scheduler, extra_state), config=config)


def copy_start(profile: IdleProfile | None, copy_s: float, copy_by: float | None) -> float:
    """Seconds from the iteration's start at which the local copy starts (0.0: at once).

    The earliest idle span that holds a copy of `copy_s` (the last one's duration) ending by
    `copy_by`, the agent's bound that leaves the push of this checkpoint its windows: a later
    span would delay the commit, and with it the push. No profile or no bound: at once.
    """
    if profile is None or copy_by is None:
        return 0.0
    span = profile.first_span_holding(copy_s, ends_by=copy_by)
    return 0.0 if span is None else span.start


@dataclass
class _Deferral:
    """When a background copy may start: in an idle span (see `copy_start`), or once `go` is set.

    `iteration_start` is when the iteration began (monotonic seconds); span starts count from it.
    """

    iteration_start: float
    profile: IdleProfile | None = None
    copy_s: float = 0.0
    go: threading.Event = field(default_factory=threading.Event)

    def wait(self, timing: SaveTiming, copy_by: float | None) -> None:
        """Hold the copy back; the time held goes to `timing.deferred_s`."""
        start = copy_start(self.profile, self.copy_s, copy_by)
        started = time.monotonic()
        until = self.iteration_start + start
        if start > 0 and until > started:
            self.go.wait(until - started)
            timing.deferred_s = time.monotonic() - started


def _save_job(
    writer: SlotWriter,
    flat: FlatState,
    layout: Layout,
    ready: Any,
    timing: SaveTiming,
    deferral: _Deferral,
) -> None:
    written = writer.write(flat, layout, ready, timing, lambda by: deferral.wait(timing, by))
    if written is not None:
        writer.commit(flat, layout, written, timing)
