"""The machine agent: owns the checkpoint memory, runs and restarts the trainers, restores them.

One per machine, outliving its trainer processes. It composes the store, the control server, the
worker group and the job coordinator; decisions come from `recovery.plan` and the fault injector.
Machine 0 is the leader: it computes each generation's restore plan and hosts its rendezvous store.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

from gemini_ckpt.agent.claim import MachineClaim
from gemini_ckpt.agent.fault_injector import FaultInjector
from gemini_ckpt.agent.persister import Persister, PersistPolicy
from gemini_ckpt.agent.server import ControlServer
from gemini_ckpt.agent.service import Connection, TrainerService
from gemini_ckpt.agent.staging import stage_from_persistent
from gemini_ckpt.agent.workers import GroupState, Rendezvous, WorkerExit, WorkerGroup
from gemini_ckpt.config import AgentConfig
from gemini_ckpt.coordination.job import JobCoordinator, WaitAborted
from gemini_ckpt.coordination.kv import KV, TCPStoreKV
from gemini_ckpt.errors import (
    CoordinationError,
    CorruptCheckpointError,
    RecoveryError,
    StoreError,
)
from gemini_ckpt.observability import events
from gemini_ckpt.observability.events import EventLog
from gemini_ckpt.recovery.classify import MemberReport, classify
from gemini_ckpt.recovery.plan import PERSISTENT_TIER, RestorePlan, plan_restore
from gemini_ckpt.snapshot.copier import ChunkCopier
from gemini_ckpt.store.local_store import LocalStore
from gemini_ckpt.store.persistent import PersistentStore

log = logging.getLogger(__name__)

_POLL_S = 0.05


@dataclass
class Outcome:
    """How a generation ended on this machine."""

    succeeded: bool = False
    job_failed: str | None = None
    staging_failed: str | None = None
    hang: str | None = None
    failures: list[WorkerExit] = field(default_factory=list)


class MachineAgent:
    """`start()`, then `run()` until the job ends (returns the exit code), then `close()`."""

    def __init__(self, config: AgentConfig, kv: KV, event_log: EventLog) -> None:
        self.config = config
        self._events = event_log
        self._coordinator = JobCoordinator(kv, config.job_id, config.machines)
        self._store = LocalStore(config.shm_dir, config.memory_limit)
        self._persistent = (
            PersistentStore(config.persist_dir, config.job_id, config.persist_keep)
            if config.persist_dir is not None
            else None
        )
        self._persister = (
            Persister(
                self._store,
                self._persistent,
                config.ranks,
                PersistPolicy(config.persist_every_steps, config.persist_every_s),
                event_log,
            )
            if self._persistent is not None
            else None
        )
        self._service = TrainerService(
            config,
            self._store,
            self._coordinator,
            FaultInjector(config.faults, event_log),
            event_log,
            on_step=self._persister.offer if self._persister is not None else None,
        )
        self._server = ControlServer(
            config.socket_path, self._service.handle, Connection, self._service.disconnected
        )
        self._workers = WorkerGroup(config, config.machine_dir / "logs")
        self._claim = MachineClaim(
            config.shm_dir.with_name(f"{config.shm_dir.name}.lock"),
            owned=(config.shm_dir, config.socket_path),
        )
        self._copier = ChunkCopier(2)
        self._rdzv_store: TCPStoreKV | None = None

    @property
    def is_leader(self) -> bool:
        """Machine 0 plans restores and hosts the workers' rendezvous."""
        return self.config.machine == 0

    def start(self) -> None:
        """Create the checkpoint memory, open the control socket, wait for the other agents.

        Raises:
            ConfigError: another agent already runs this job's machine on this host.
        """
        self._claim.acquire()
        self._events.start()
        self._store.start()
        if self._persister is not None:
            self._persister.start()
        self._server.start()
        self._events.emit(
            events.AGENT_STARTED,
            ranks=list(self.config.ranks),
            memory_limit=self.config.memory_limit,
        )
        self._coordinator.join(self.config.machine, self.config.join_timeout_s)

    def run(self) -> int:
        """Run generations of the worker group until it succeeds or the job gives up."""
        generation = self._coordinator.generation()
        while True:
            try:
                self._begin_generation(generation)
            except WaitAborted as e:
                log.warning("generation %d did not start: %s", generation, e)
                outcome = Outcome(job_failed=self._coordinator.failure())
            except (CorruptCheckpointError, StoreError) as e:
                log.error("generation %d could not stage its restore: %s", generation, e)
                outcome = Outcome(staging_failed=str(e))
            except CoordinationError as e:
                return self._give_up(f"generation {generation} could not start: {e}")
            else:
                outcome = self._supervise(generation)
            if outcome.succeeded:
                self._events.emit(events.JOB_FINISHED, status="succeeded", generation=generation)
                return 0
            next_generation = self._end_generation(generation, outcome)
            if next_generation is None:
                return 1
            generation = next_generation

    def close(self) -> None:
        """Stop the workers and release everything this machine holds."""
        if not self._claim.held:
            return  # start() was refused: everything here belongs to the agent that holds it
        self._service.close_generation("agent shutting down")
        self._workers.stop()
        if self._persister is not None:
            self._persister.close()
        self._server.close()
        self._store.close()
        self._copier.close()
        self._claim.release()
        with contextlib.suppress(OSError):
            # The job's directory goes with its last machine (rmdir fails while others remain).
            self.config.shm_dir.parent.rmdir()
        self._rdzv_store = None
        self._events.close()

    def _give_up(self, reason: str) -> int:
        """End the job for every machine (best effort) and report it."""
        log.error("%s", reason)
        with contextlib.suppress(CoordinationError):
            self._coordinator.fail_job(reason)
        self._events.emit(events.JOB_FINISHED, status="failed", reason=reason)
        return 1

    def _aborted(self, generation: int) -> str | None:
        failure = self._coordinator.failure()
        if failure:
            return f"the job failed: {failure}"
        current = self._coordinator.generation()
        return f"generation {current} replaced {generation}" if current != generation else None

    def _begin_generation(self, generation: int) -> RestorePlan:
        timeout = self.config.join_timeout_s
        abort = lambda: self._aborted(generation)  # noqa: E731
        self._coordinator.publish_inventory(
            generation, self.config.machine, self._store.inventory()
        )
        if self.is_leader:
            inventories = self._coordinator.inventories(generation, timeout, abort)
            persisted = self._persistent.inventory() if self._persistent is not None else None
            plan = plan_restore(generation, self.config.world_size, inventories, persisted)
            self._rdzv_store = TCPStoreKV.host(self.config.store_addr, 0)
            self._coordinator.publish_plan(
                generation,
                plan.to_dict(),
                {"addr": self.config.store_addr, "port": self._rdzv_store.port},
            )
        raw_plan, worker_store = self._coordinator.plan(generation, timeout, abort)
        plan = RestorePlan.from_dict(raw_plan)
        dropped = self._store.truncate_after(plan.step if plan.step is not None else -1)
        self._stage(generation, plan)
        self._service.open_generation(generation, plan)
        self._events.emit(
            events.PLAN,
            generation=generation,
            step=plan.step,
            sources={str(r): s for r, s in plan.sources.items() if r in self.config.ranks},
            reason=plan.reason,
            dropped={str(r): s for r, s in dropped.items()},
        )
        log.info("generation %d: %s", generation, plan.reason)
        self._workers.start(
            Rendezvous(generation, str(worker_store["addr"]), int(worker_store["port"]))
        )
        self._events.emit(
            events.GENERATION_STARTED,
            generation=generation,
            pids={str(self.config.ranks[i]): p for i, p in self._workers.pids().items()},
        )
        return plan

    def _stage(self, generation: int, plan: RestorePlan) -> None:
        """Bring the plan's step into memory for local ranks that restore from another tier."""
        for rank in self.config.ranks:
            if plan.step is None or plan.sources.get(rank) != PERSISTENT_TIER:
                continue
            if self._persistent is None:
                raise RecoveryError(
                    f"the plan restores rank {rank} from the persistent tier, "
                    "but this machine has no --persist-dir"
                )
            seconds = stage_from_persistent(
                self._store, self._persistent, rank, plan.step, self._copier
            )
            self._events.emit(
                events.STAGED,
                generation=generation,
                rank=rank,
                step=plan.step,
                source=PERSISTENT_TIER,
                seconds=seconds,
            )

    def _supervise(self, generation: int) -> Outcome:
        marked_done = False
        started = time.monotonic()
        while True:
            state, failures = self._workers.poll()
            if state is GroupState.FAILED:
                return Outcome(failures=failures)
            hang = self._hang(started) if state is GroupState.RUNNING else None
            if hang is not None:
                return Outcome(hang=hang)
            failure = self._coordinator.failure()
            if failure:
                return Outcome(job_failed=failure)
            if self._coordinator.generation() != generation:
                return Outcome()
            if state is GroupState.SUCCEEDED:
                if not marked_done:
                    self._coordinator.mark_done(generation, self.config.machine)
                    marked_done = True
                if self._coordinator.all_done(generation):
                    return Outcome(succeeded=True)
            time.sleep(_POLL_S)

    def _hang(self, started: float) -> str | None:
        step, at = self._service.last_progress()
        report = MemberReport(alive=True, last_step=step, last_step_at=at)
        incident = classify(
            time.monotonic(), {self.config.machine: report}, self.config.hang_timeout_s, started
        )
        return incident.reason if incident is not None else None

    def _end_generation(self, generation: int, outcome: Outcome) -> int | None:
        """Stop this generation's workers; return the next generation, or None if the job ends."""
        if outcome.failures:
            detected = time.time()
            reasons = [f.describe() for f in outcome.failures]
            for failure in outcome.failures:
                self._events.emit(
                    events.WORKER_FAILED,
                    generation=generation,
                    rank=failure.rank,
                    pid=failure.pid,
                    exitcode=failure.exitcode,
                    description=failure.describe(),
                    last_committed=self._store.latest(failure.rank),
                    stderr_tail=self._workers.stderr_tail(failure.local_rank),
                )
            log.warning("generation %d failed: %s", generation, "; ".join(reasons))
            new = self._coordinator.request_restart(
                self.config.machine, generation, {"failures": reasons, "detected": detected}
            )
        elif outcome.hang:
            self._events.emit(
                events.HANG,
                generation=generation,
                reason=outcome.hang,
                ranks=list(self.config.ranks),
                last_committed=self._service.last_progress()[0],
            )
            log.warning("generation %d is hung: %s", generation, outcome.hang)
            new = self._coordinator.request_restart(
                self.config.machine, generation, {"failures": [outcome.hang]}
            )
        elif outcome.staging_failed:
            new = self._coordinator.request_restart(
                self.config.machine, generation, {"failures": [outcome.staging_failed]}
            )
        else:
            new = self._coordinator.generation()
        self._service.close_generation(f"generation {generation} is over")
        self._stop_workers()
        if outcome.job_failed:
            self._events.emit(events.JOB_FINISHED, status="failed", reason=outcome.job_failed)
            return None
        if new > self.config.max_restarts:
            reason = (
                f"restart limit reached: generation {new} would be restart number {new}, "
                f"--max-restarts is {self.config.max_restarts}"
            )
            self._coordinator.fail_job(reason)
            self._events.emit(events.JOB_FINISHED, status="failed", reason=reason)
            return None
        self._events.emit(
            events.RESTART,
            generation=new,
            previous=generation,
            reasons=self._coordinator.restart_reasons(new),
        )
        return new

    def _stop_workers(self) -> None:
        """Let saves already under way commit (bounded), then stop every worker."""
        deadline = time.monotonic() + self.config.stop_grace_s
        while time.monotonic() < deadline:
            writing = [r for r in self.config.ranks if self._store.writing_step(r) is not None]
            if not writing:
                break
            time.sleep(0.01)
        self._workers.stop()
        for rank in self.config.ranks:
            step = self._store.abort_writes(rank)
            if step is not None:
                log.warning(
                    "rank %d was stopped while writing step %d; that slot is discarded", rank, step
                )
