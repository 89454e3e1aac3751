"""The agent's answers to its trainers' requests (see `protocol/messages.py` for the call order).

Holds no policy of its own beyond bookkeeping: which slot to write comes from the store, which step
to restore from the generation's plan, when to kill from the fault injector.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gemini_ckpt.agent.fault_injector import FaultInjector
from gemini_ckpt.agent.service_hooks import Connection, ServiceHooks
from gemini_ckpt.agent.step_reports import StepReporter
from gemini_ckpt.config import AgentConfig
from gemini_ckpt.coordination.job import JobCoordinator
from gemini_ckpt.errors import (
    CoordinationUnavailableError,
    ProtocolError,
    RecoveryError,
)
from gemini_ckpt.observability import events
from gemini_ckpt.observability.events import EventLog
from gemini_ckpt.protocol.manifest import Manifest
from gemini_ckpt.protocol.messages import Request, parse_timing
from gemini_ckpt.recovery.plan import FRESH_START, RestorePlan
from gemini_ckpt.store.local_store import LocalStore

log = logging.getLogger(__name__)


@dataclass
class _Progress:
    reported: int | None = None
    at: float = field(default_factory=time.monotonic)
    timings: dict[int, dict[int, Any]] = field(default_factory=dict)
    timings_seen: bool = False
    """Whether this generation completed a step on this machine yet (its timeline's last mark)."""


class TrainerService:
    """Dispatches validated requests; thread-safe (one thread per trainer connection)."""

    def __init__(
        self,
        config: AgentConfig,
        store: LocalStore,
        coordinator: JobCoordinator,
        injector: FaultInjector,
        event_log: EventLog,
        hooks: ServiceHooks | None = None,
    ) -> None:
        hooks = hooks or ServiceHooks()
        self._on_step = hooks.on_step
        self._on_iteration = hooks.on_iteration
        self._copy_by = hooks.copy_by
        self._config = config
        self._store = store
        self._coordinator = coordinator
        self._injector = injector
        self._events = event_log
        self._lock = threading.Lock()
        self._pids: dict[int, int] = {}
        self._progress = _Progress()
        self._generation = -1
        self._plan: RestorePlan | None = None
        self._stopping: str | None = None
        self._steps = StepReporter(coordinator, config.machine, hooks.timeline)
        self._restored_ranks: dict[int, float] = {}
        self._etcd_quiet_until = 0.0
        self._handlers: dict[str, Callable[[Request, Connection], dict[str, Any]]] = {
            "hello": self._hello,
            "allocate": self._allocate,
            "begin": self._begin,
            "commit": self._commit,
            "abort": self._abort,
            "restore": self._restore,
            "restored": self._restored,
            "report_corrupt": self._report_corrupt,
            "failpoint": self._failpoint,
            "stats": self._stats,
        }
        for op, answer in hooks.handlers.items():
            self._handlers[op] = _ignoring_connection(answer)

    # -- called by the agent's run loop ----------------------------------------------------------

    def open_generation(self, generation: int, plan: RestorePlan) -> None:
        """Serve trainers of `generation`, restoring per `plan`."""
        with self._lock:
            self._generation, self._plan, self._stopping = generation, plan, None
            self._pids.clear()
            self._restored_ranks.clear()
            self._progress = _Progress(reported=plan.step)

    def close_generation(self, reason: str) -> None:
        """Stop serving the current generation: waits in `begin` give up with `reason`."""
        with self._lock:
            self._stopping = reason

    def last_progress(self) -> tuple[int | None, float]:
        """This machine's newest step committed by all its ranks, and when (monotonic seconds)."""
        with self._lock:
            return self._progress.reported, self._progress.at

    def latest(self, rank: int) -> int | None:
        """`rank`'s newest committed step in this machine's memory."""
        return self._store.latest(rank)

    def pid(self, rank: int) -> int | None:
        """Process id of `rank`'s trainer in this generation, if it said hello."""
        with self._lock:
            return self._pids.get(rank)

    def _abort_reason(self, generation: int) -> str | None:
        with self._lock:
            if generation != self._generation:
                return f"generation {generation} is over"
            return self._stopping

    # -- dispatch --------------------------------------------------------------------------------

    def handle(self, request: Request, conn: Connection) -> dict[str, Any]:
        """Answer one request (raises a GeminiError to send an error reply)."""
        if request.op not in ("stats",) and request["rank"] not in self._config.ranks:
            raise ProtocolError(
                f"rank {request['rank']} does not run on machine {self._config.machine} "
                f"(its ranks are {self._config.ranks.start}..{self._config.ranks.stop - 1})"
            )
        if request.op not in ("hello", "stats") and conn.rank != request["rank"]:
            raise ProtocolError(f"op {request.op!r} for rank {request['rank']} before its hello")
        return self._handlers[request.op](request, conn)

    def disconnected(self, conn: Connection) -> None:
        """A trainer's connection closed: an unfinished write of its rank is torn, forget it."""
        if conn.rank is None or conn.writing is None:
            return
        if self._store.abort_write(conn.rank, conn.writing):
            log.warning(
                "rank %d disconnected while writing step %d; the slot is discarded",
                conn.rank,
                conn.writing,
            )

    def _hello(self, request: Request, conn: Connection) -> dict[str, Any]:
        with self._lock:
            if request["generation"] != self._generation:
                raise RecoveryError(
                    f"trainer of generation {request['generation']} arrived while the job is in "
                    f"generation {self._generation}; refusing it"
                )
            rank = request["rank"]
            other = self._pids.get(rank)
            if other is not None and other != conn.peer_pid and _alive(other):
                raise ProtocolError(
                    f"rank {rank} already has a trainer (pid {other}) in generation "
                    f"{self._generation}; refusing pid {conn.peer_pid}"
                )
            self._pids[rank] = conn.peer_pid or request["pid"]
            conn.generation = self._generation
        conn.rank = request["rank"]
        return {
            "job": self._config.job_id,
            "machine": self._config.machine,
            "failpoints": self._injector.failpoints(request["rank"]),
        }

    def _allocate(self, request: Request, _conn: Connection) -> dict[str, Any]:
        capacity = self._store.allocate(request["rank"], request["nbytes"])
        usage = self._store.usage()
        log.info("rank %d: slots of %d bytes; %s", request["rank"], capacity, usage.describe())
        self._events.emit(
            events.MEMORY,
            rank=request["rank"],
            slot_bytes=capacity,
            reserved=usage.reserved,
            budget=usage.budget,
        )
        return {"capacity": capacity}

    def _begin(self, request: Request, conn: Connection) -> dict[str, Any]:
        rank, step = request["rank"], request["step"]
        timing = parse_timing(request.fields.get("timing"))
        if self._on_iteration is not None and timing:
            self._on_iteration(rank, step, timing)
        grant = self._store.prepare_write(rank, step)
        if grant.overwrites is not None and grant.keep is not None:
            settled = self._settle(conn, grant.keep)
            if settled is None:
                # etcd cannot say right now: skip this save rather than stop training on etcd.
                self._steps.queue(conn.generation, step, "skipped")
                return {"skip": True, "reason": f"etcd unavailable to settle step {grant.keep}"}
            if settled == "skipped":
                # Some rank skipped the newest step: give it up and keep the older, complete one.
                grant = self._store.prepare_write(rank, step, give_up=grant.keep)
        with self._lock:
            if conn.generation != self._generation:
                raise RecoveryError(
                    f"generation {conn.generation} is over; step {step} not written"
                )
            path = self._store.begin_write(rank, grant)
            conn.writing = step
        copy_by = self._copy_by() if self._copy_by is not None else None
        return {
            "slot": grant.slot,
            "path": str(path),
            "job": self._config.job_id,
            **({"copy_by_s": copy_by} if copy_by is not None else {}),
        }

    def _commit(self, request: Request, conn: Connection) -> dict[str, Any]:
        rank = request["rank"]
        manifest = Manifest.from_dict(request["manifest"])
        timing = parse_timing(request.fields.get("timing"))
        if (manifest.job, manifest.world_size) != (self._config.job_id, self._config.world_size):
            raise ProtocolError(
                f"manifest of job {manifest.job!r} with world size {manifest.world_size} sent to "
                f"job {self._config.job_id!r} with world size {self._config.world_size}"
            )
        self._store.commit(rank, request["slot"], manifest)
        conn.writing = None
        self._record_progress(rank, manifest.step, timing)
        if self._on_iteration is not None:
            self._on_iteration(rank, manifest.step, timing)
        self._injector.after_commit(rank, manifest.step, self.pid(rank), self._store)
        return {}

    def _record_progress(self, rank: int, step: int, timing: dict[str, Any]) -> None:
        with self._lock:
            self._progress.timings.setdefault(step, {})[rank] = timing
            latest = [self._store.latest(r) for r in self._config.ranks]
            floor = min(s if s is not None else -1 for s in latest)
            if floor < step or (
                self._progress.reported is not None and floor <= self._progress.reported
            ):
                return
            self._progress.reported = floor
            self._progress.at = time.monotonic()
            first_in_generation = not self._progress.timings_seen
            self._progress.timings_seen = True
            timings = self._progress.timings.pop(floor, {})
            for old in [s for s in self._progress.timings if s < floor]:
                del self._progress.timings[old]
            generation = self._generation
        self._report_committed(generation, floor)
        if first_in_generation and generation > 0:
            self._steps.queue_timeline(
                generation, {"first_step_at": time.time(), "first_step": floor}
            )
        if self._on_step is not None:
            self._on_step(floor)
        first = min(timings) if timings else None
        self._events.emit(
            events.PROGRESS,
            generation=generation,
            step=floor,
            rank=first,
            **(timings.get(first, {}) if first is not None else {}),
        )

    def _settle(self, conn: Connection, keep: int) -> str | None:
        """Wait until step `keep` is "complete" or "skipped" job-wide; None if etcd can't say.

        The slot to reuse holds an older step; the other slot's step must be held by every rank
        of the job first, or a failure now could leave no step common to all ranks. A step some
        rank skipped is never common: then the older step is kept instead.
        """
        if time.monotonic() < self._etcd_quiet_until:
            return None  # etcd just failed to answer: do not make every step wait to find out
        try:
            return self._coordinator.wait_settled(
                conn.generation,
                keep,
                self._config.commit_wait_timeout_s,
                lambda: self._abort_reason(conn.generation),
            )
        except CoordinationUnavailableError as e:
            log.warning("skipping saves for a second: %s", e)
            self._etcd_quiet_until = time.monotonic() + 1.0
            return None

    def _report_committed(self, generation: int, step: int) -> None:
        """Count `step` as committed on this machine in etcd (a commit never waits for etcd)."""
        self._steps.queue(generation, step, "committed")

    def start(self) -> None:
        """Start sending step counts to etcd."""
        self._steps.start()

    def close(self) -> None:
        """Stop sending step counts."""
        self._steps.close()

    def _abort(self, request: Request, conn: Connection) -> dict[str, Any]:
        if self._store.abort_write(request["rank"], request["step"]):
            log.warning(
                "rank %d abandoned step %d: %s", request["rank"], request["step"], request["reason"]
            )
        conn.writing = None
        return {}

    def _restore(self, request: Request, _conn: Connection) -> dict[str, Any]:
        rank = request["rank"]
        with self._lock:
            plan = self._plan
        if plan is None:
            raise RecoveryError("no restore plan yet for this generation")
        source = plan.sources.get(rank, FRESH_START)
        if plan.step is None:
            return {"step": None, "source": source}
        ref = self._store.locate(rank, plan.step)
        if ref is None:
            raise RecoveryError(
                f"the plan restores step {plan.step} but rank {rank} does not hold it"
            )
        return {
            "step": plan.step,
            "source": source,
            "path": str(ref.path),
            "manifest": ref.manifest.to_dict(),
        }

    def _restored(self, request: Request, _conn: Connection) -> dict[str, Any]:
        with self._lock:
            plan = self._plan
        source = plan.sources.get(request["rank"], "?") if plan else "?"
        with self._lock:
            self._restored_ranks[request["rank"]] = request["seconds"]
            done = len(self._restored_ranks) == len(self._config.ranks)
            generation = self._generation
            slowest = max(self._restored_ranks.values())
        if done and generation > 0:
            self._steps.queue_timeline(
                generation, {"restored_at": time.time(), "restore_s": slowest}
            )
        self._events.emit(
            events.RESTORED,
            generation=self._generation,
            rank=request["rank"],
            step=request["step"],
            source=source,
            seconds=request["seconds"],
        )
        return {}

    def _report_corrupt(self, request: Request, _conn: Connection) -> dict[str, Any]:
        rank, step = request["rank"], request["step"]
        dropped = self._store.drop(rank, step)
        log.error(
            "rank %d step %d failed verification and is dropped: %s", rank, step, request["detail"]
        )
        self._events.emit(
            events.CORRUPT,
            generation=self._generation,
            rank=rank,
            step=step,
            detail=request["detail"],
            dropped=dropped,
        )
        return {}

    def _failpoint(self, request: Request, _conn: Connection) -> dict[str, Any]:
        rank = request["rank"]
        self._injector.at_failpoint(rank, request["name"], request["step"], self.pid(rank))
        return {}

    def _stats(self, _request: Request, _conn: Connection) -> dict[str, Any]:
        usage = self._store.usage()
        return {
            "generation": self._generation,
            "budget": usage.budget,
            "reserved": usage.reserved,
            "inventory": {str(r): s for r, s in self._store.inventory().items()},
        }


def _ignoring_connection(
    answer: Callable[[Request], dict[str, Any]],
) -> Callable[[Request, Connection], dict[str, Any]]:
    return lambda request, _conn: answer(request)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
