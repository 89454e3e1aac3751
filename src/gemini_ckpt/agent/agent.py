"""The machine agent: owns the checkpoint memory, runs and restarts the trainers, restores them.

One per machine, outliving its trainer processes. It holds a membership lease in etcd, reports
what happens to its trainers, and campaigns for the root role (`root.py`), which decides every
recovery; the agent carries out each generation the root opens: stop the trainers, report what
it holds, load what the plan says, start the trainers again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field

from gemini_ckpt.agent.claim import MachineClaim
from gemini_ckpt.agent.fault_injector import FaultInjector, kill_machine
from gemini_ckpt.agent.persister import Persister, PersistPolicy
from gemini_ckpt.agent.replicas import ReplicaRole, resolve_secret
from gemini_ckpt.agent.reporting import StatusReporter
from gemini_ckpt.agent.root import RootRole
from gemini_ckpt.agent.server import ControlServer
from gemini_ckpt.agent.service import TrainerService
from gemini_ckpt.agent.service_hooks import Connection, ServiceHooks
from gemini_ckpt.agent.staging import stage_plan
from gemini_ckpt.agent.workers import (
    GroupState,
    Rendezvous,
    WorkerExit,
    WorkerGroup,
    stop_after_saves,
)
from gemini_ckpt.config import AgentConfig
from gemini_ckpt.coordination.control import ControlPlane
from gemini_ckpt.coordination.control_kv import ControlKV
from gemini_ckpt.coordination.job import JobCoordinator, WaitAborted
from gemini_ckpt.coordination.lease import LeaseKeeper
from gemini_ckpt.errors import (
    CoordinationError,
    CorruptCheckpointError,
    RecoveryError,
    ReplicationError,
    StoreError,
)
from gemini_ckpt.observability import events
from gemini_ckpt.observability.events import EventLog
from gemini_ckpt.recovery.plan import RestorePlan
from gemini_ckpt.snapshot.copier import ChunkCopier
from gemini_ckpt.store.budget import MemoryBudget
from gemini_ckpt.store.local_store import LocalStore
from gemini_ckpt.store.persistent import PersistentStore

log = logging.getLogger(__name__)

_POLL_S = 0.05


@dataclass
class Outcome:
    """How a generation ended on this machine."""

    succeeded: bool = False
    job_failed: str | None = None
    lease_lost: str | None = None
    failures: list[WorkerExit] = field(default_factory=list)


class MachineAgent:
    """`start()`, then `run()` until the job ends (returns the exit code), then `close()`."""

    def __init__(self, config: AgentConfig, kv: ControlKV, event_log: EventLog) -> None:
        self.config = config
        self._events = event_log
        self._coordinator = JobCoordinator(kv, config.job_id, config.machines)
        self._plane = ControlPlane(kv, config.job_id, config.machines)
        budget = MemoryBudget(config.memory_limit, copies=config.effective_replicas)
        self._store = LocalStore(config.shm_dir, budget)
        self._persistent = (
            PersistentStore(config.persist_dir, config.job_id, config.persist_keep)
            if config.persist_dir is not None
            else None
        )
        self._injector = FaultInjector(
            config.faults,
            event_log,
            claim=lambda f: self._plane.claim_fault(
                f"{f.kind}-s{f.step}-r{f.rank}-m{f.machine}-{f.point.value}{f.where}"
            ),
        )
        self._persister = (
            Persister(
                self._store,
                self._persistent,
                config.ranks,
                PersistPolicy(config.persist_every_steps, config.persist_every_s),
                event_log,
                self._injector.after_persisted,
            )
            if self._persistent is not None
            else None
        )
        self._replicas = ReplicaRole(
            config, self._store, budget, event_log, self._injector.corrupt_in_flight
        )
        self._service = TrainerService(
            config,
            self._store,
            self._coordinator,
            self._injector,
            event_log,
            ServiceHooks(
                on_step=self._on_step,
                timeline=lambda g, fields: self._plane.record_timeline(g, config.machine, fields),
                **self._replicas.service_hooks(),
            ),
        )
        self._server = ControlServer(
            config.socket_path, self._service.handle, Connection, self._service.disconnected
        )
        self._workers = WorkerGroup(config, config.machine_dir / "logs")
        self._claim = MachineClaim(
            config.shm_dir.with_name(f"{config.shm_dir.name}.lock"),
            owned=(config.shm_dir, config.socket_path),
        )
        self._reporter = StatusReporter(
            config.machine,
            self._plane,
            self._service,
            self._workers,
            event_log,
            self._replicas.status,
        )
        self._root = RootRole(config, self._plane, self._coordinator, event_log, self._persistent)
        self._copier = ChunkCopier(2)
        self._lease: LeaseKeeper | None = None

    def start(self) -> None:
        """Claim the machine, create its memory, join the job in etcd, campaign for root.

        Raises:
            ConfigError: another agent already runs this job's machine on this host.
            CoordinationError: etcd cannot be reached, or the other machines never joined.
        """
        self._claim.acquire()
        self._events.start()
        self._store.start()
        if self._persister is not None:
            self._persister.start()
        self._service.start()
        self._server.start()
        replica_addr = (
            self._replicas.start(resolve_secret(self.config, self._plane))
            if self._replicas.enabled
            else None
        )
        lease = self._plane.kv.grant_lease(self.config.member_ttl_s)
        self._lease = LeaseKeeper(self._plane.kv, lease).start()
        self._plane.join(
            self.config.machine,
            lease.id,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "addr": self.config.local_addr,
                "replica_addr": replica_addr,
                "ranks": list(self.config.ranks),
                "started_at": time.time(),
            },
        )
        self._events.emit(
            events.AGENT_STARTED,
            ranks=list(self.config.ranks),
            memory_limit=self.config.memory_limit,
            lease=lease.id,
        )
        self._plane.wait_members(self.config.join_timeout_s)
        self._root.start(lease.id)

    def run(self) -> int:
        """Carry out generations until the job succeeds, fails, or this machine is declared lost."""
        generation = self._coordinator.generation()
        while True:
            try:
                self._begin_generation(generation)
                outcome = self._supervise(generation)
            except WaitAborted as e:
                log.warning("generation %d did not start: %s", generation, e)
                outcome = Outcome(
                    job_failed=self._coordinator.failure(), lease_lost=self._lease_lost()
                )
            except (CorruptCheckpointError, StoreError, RecoveryError, ReplicationError) as e:
                log.error("generation %d could not load its restore: %s", generation, e)
                self._reporter.report(
                    generation,
                    failures=[f"machine {self.config.machine}: {e}"],
                    failed_ranks=list(self.config.ranks),
                )
                outcome = self._wait_for_decision(generation)
            except CoordinationError as e:
                return self._give_up(f"generation {generation} could not start: {e}")
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
        self._root.close()
        self._workers.stop()
        self._replicas.close()
        if self._persister is not None:
            self._persister.close()
        if self._lease is not None:
            self._lease.close(revoke=True)
        self._server.close()
        self._service.close()
        self._store.close()
        self._copier.close()
        self._claim.release()
        with contextlib.suppress(OSError):
            # The job's directory goes with its last machine (rmdir fails while others remain).
            self.config.shm_dir.parent.rmdir()
        self._events.close()

    # -- one generation ------------------------------------------------------------------------

    def _lease_lost(self) -> str | None:
        return self._lease.lost if self._lease is not None else None

    def _aborted(self, generation: int) -> str | None:
        lost = self._lease_lost()
        if lost:
            return f"this machine's membership lease was lost ({lost})"
        failure = self._coordinator.failure()
        if failure:
            return f"the job failed: {failure}"
        current = self._coordinator.generation()
        return f"generation {current} replaced {generation}" if current != generation else None

    def _begin_generation(self, generation: int) -> None:
        self._replicas.enter(generation)
        self._injector.corrupt_replicas(self._replicas.store)
        self._coordinator.publish_inventory(
            generation, self.config.machine, self._store.inventory(), self._replicas.inventory()
        )
        raw_plan, worker_store = self._coordinator.plan(
            generation, self.config.join_timeout_s, lambda: self._aborted(generation)
        )
        plan = RestorePlan.from_dict(raw_plan)
        dropped = self._store.truncate_after(plan.step if plan.step is not None else -1)
        self._replicas.learn_addresses(self._plane.members())
        self._stage(generation, plan)
        self._replicas.resume(plan.step)
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
        self._reporter.report(generation)
        self._events.emit(
            events.GENERATION_STARTED,
            generation=generation,
            pids={str(self.config.ranks[i]): p for i, p in self._workers.pids().items()},
        )

    def _stage(self, generation: int, plan: RestorePlan) -> None:
        """Bring the plan's step into memory for local ranks that restore from another tier."""
        fetch = self._replicas.fetch if self._replicas.enabled else None
        staged = stage_plan(
            self._store, self._persistent, plan, self.config.ranks, self._copier, fetch
        )
        for rank, (source, seconds) in staged.items():
            self._events.emit(
                events.STAGED,
                generation=generation,
                rank=rank,
                step=plan.step,
                source=source,
                seconds=seconds,
            )

    def _supervise(self, generation: int) -> Outcome:
        started, reported, marked_done = time.monotonic(), False, False
        while True:
            state, failures = self._workers.poll()
            if not reported and state is GroupState.FAILED:
                self._reporter.failures(generation, failures)
                reported = True
            if not reported and state is GroupState.RUNNING:
                reported = self._reporter.hang(
                    generation,
                    self.config.ranks,
                    started,
                    (self.config.hang_timeout_s, self.config.startup_timeout_s),
                )
            outcome = self._interrupted(generation)
            if outcome is not None:
                return outcome
            if state is GroupState.SUCCEEDED and not reported:
                with contextlib.suppress(CoordinationError):
                    if not marked_done:
                        self._coordinator.mark_done(generation, self.config.machine)
                        marked_done = True
                    if self._coordinator.all_done(generation):
                        return Outcome(succeeded=True)
            time.sleep(_POLL_S)

    def _wait_for_decision(self, generation: int) -> Outcome:
        """After reporting a failure: wait for the root to move the job on."""
        while True:
            outcome = self._interrupted(generation)
            if outcome is not None:
                return outcome
            time.sleep(_POLL_S)

    def _interrupted(self, generation: int) -> Outcome | None:
        lost = self._lease_lost()
        if lost:
            return Outcome(lease_lost=lost)
        try:
            failure = self._coordinator.failure()
            moved = self._coordinator.generation() != generation
        except CoordinationError as e:
            # etcd briefly away: training goes on; only decisions wait for it (the lease keeper
            # declares this machine lost if it stays away a whole TTL).
            log.debug("etcd unavailable while supervising: %s", e)
            return None
        if failure:
            return Outcome(job_failed=failure)
        return Outcome() if moved else None

    def _end_generation(self, generation: int, outcome: Outcome) -> int | None:
        """Stop this generation's workers; return the next generation, or None if the job ends."""
        self._service.close_generation(f"generation {generation} is over")
        stop_after_saves(self._workers, self._store, self.config.ranks, self.config.stop_grace_s)
        if outcome.lease_lost:
            reason = (
                f"machine {self.config.machine} lost its membership lease "
                f"({outcome.lease_lost}); the job has declared it failed"
            )
            self._events.emit(events.JOB_FINISHED, status="failed", reason=reason)
            log.error("%s", reason)
            return None
        if outcome.job_failed:
            self._events.emit(events.JOB_FINISHED, status="failed", reason=outcome.job_failed)
            return None
        new = self._coordinator.generation()
        self._events.emit(
            events.RESTART, generation=new, previous=generation, reasons=self._plane.timeline(new)
        )
        return new

    def _give_up(self, reason: str) -> int:
        """End the job for every machine (best effort) and report it."""
        log.error("%s", reason)
        with contextlib.suppress(CoordinationError):
            self._coordinator.fail_job(reason)
        self._events.emit(events.JOB_FINISHED, status="failed", reason=reason)
        return 1

    # -- per step ------------------------------------------------------------------------------

    def _on_step(self, step: int) -> None:
        """Every rank of this machine committed `step`."""
        if self._persister is not None:
            self._persister.offer(step)
        self._replicas.offer()
        fault = self._injector.machine_fault_due(step, self._root.leading)
        if fault is not None and fault.kind == "partition":
            self._replicas.partition(fault.seconds)
        elif fault is not None:
            # The machine dies once `step` is everywhere it sends it (a group: once every rank of
            # the job holds it, so no member dies before another committed it), as in a crash
            # during the next iteration. Bounded: a partitioned peer does not stall it.
            if fault.kind == "kill-group":
                with contextlib.suppress(CoordinationError):
                    generation = self._coordinator.generation()
                    self._coordinator.wait_complete(generation, step, 10.0, lambda: None)
            else:
                self._replicas.wait_replicated(step, timeout_s=10.0)
            where = (self.config.machine, self._root.leading)
            pids = list(self._workers.pids().values())
            kill_machine(self._events.emit, fault, step, where, pids, self.config.shm_dir)
