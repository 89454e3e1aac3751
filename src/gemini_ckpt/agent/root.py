"""The root role: one agent, elected through etcd, decides every recovery of the job.

Every agent campaigns with its membership lease, so the root's machine dying frees the role within
one lease TTL. While it leads, the root polls what the agents publish, classifies incidents with
`recovery.classify` (machine failure: a member's lease expired; software failure: an agent reports
a dead or hung trainer), asks an operator to replace lost machines, opens the next generation, and
once every machine of the job has reported what it holds, computes and publishes the restore plan
and hosts the generation's rendezvous store. Each of those writes is fenced by its leadership.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from typing import Any

from gemini_ckpt.config import AgentConfig
from gemini_ckpt.coordination.control import ControlPlane
from gemini_ckpt.coordination.election import Election, Leadership
from gemini_ckpt.coordination.job import JobCoordinator
from gemini_ckpt.coordination.kv import TCPStoreKV
from gemini_ckpt.errors import CoordinationError, NotLeaderError
from gemini_ckpt.observability import events
from gemini_ckpt.observability.events import EventLog
from gemini_ckpt.recovery.classify import Incident, IncidentKind, MemberReport, classify
from gemini_ckpt.recovery.plan import plan_restore
from gemini_ckpt.store.persistent import PersistentStore

log = logging.getLogger(__name__)

_TICK_S = 0.05


class RootRole:
    """`start()` to campaign (and lead when elected) on a named thread; `close()` to stop."""

    def __init__(
        self,
        config: AgentConfig,
        plane: ControlPlane,
        coordinator: JobCoordinator,
        event_log: EventLog,
        persistent: PersistentStore | None,
    ) -> None:
        self._config = config
        self._plane = plane
        self._coordinator = coordinator
        self._events = event_log
        self._persistent = persistent
        self._lease = 0
        self._stop = threading.Event()
        self._leading = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker_store: TCPStoreKV | None = None

    @property
    def leading(self) -> bool:
        """Whether this agent is the root now."""
        return self._leading.is_set()

    def start(self, lease: int) -> None:
        """Campaign with `lease` (the agent's membership lease) until closed."""
        self._lease = lease
        self._thread = threading.Thread(target=self._run, name="gemini-root", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop campaigning or leading (the lease, revoked by the agent, ends the term)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._worker_store = None

    def _run(self) -> None:
        election = Election(
            self._plane.kv, self._plane.leader_key, f"m{self._config.machine}", poll_s=0.2
        )
        while not self._stop.is_set():
            try:
                leadership = election.campaign(self._lease, timeout_s=2.0)
            except CoordinationError as e:
                # A campaign cut short by its own deadline, or etcd briefly away: try again.
                log.debug("root campaign interrupted: %s", e)
                self._stop.wait(0.2)
                continue
            if leadership is not None:
                self._lead(leadership)

    def _lead(self, leadership: Leadership) -> None:
        self._leading.set()
        self._events.emit(events.ROOT_ELECTED, revision=leadership.revision)
        log.info("machine %d is the root (term %d)", self._config.machine, leadership.revision)
        try:
            while not self._stop.wait(_TICK_S):
                try:
                    self._tick(leadership)
                except NotLeaderError as e:
                    self._events.emit(events.ROOT_LOST, reason=str(e))
                    return
                except CoordinationError as e:
                    log.warning("root: %s", e)
        finally:
            self._leading.clear()

    def _tick(self, leadership: Leadership) -> None:
        if self._coordinator.failure():
            return
        generation = self._coordinator.generation()
        incident = self._incident(generation)
        if incident is not None:
            self._decide(leadership, generation, incident)
        elif not self._coordinator.has_plan(generation):
            self._plan(leadership, generation)

    def _incident(self, generation: int) -> Incident | None:
        members = self._plane.members()
        statuses = self._plane.statuses()
        requests = self._plane.replacement_requests()
        # A machine whose workers all finished leaves the job, and its lease with it: that is
        # the job ending, not a lost machine (read after the members, so a machine that marks
        # itself done and leaves in between is seen as done).
        finished = self._coordinator.done_machines(generation)
        view = {}
        for machine in range(self._config.machines):
            if machine in finished:
                view[machine] = MemberReport(alive=True, failed_ranks=[])
                continue
            # Asked for and not joined yet (possibly for an earlier generation, when machines
            # are lost one after another): not lost again, unless its replacement never comes.
            request = requests.get(machine, {})
            pending = (
                bool(request)
                and "joined_at" not in request
                and time.time() - float(request.get("at", 0)) < self._config.join_timeout_s
            )
            status = statuses.get(machine, {})
            failed = (
                status.get("failed_ranks", []) if status.get("generation") == generation else []
            )
            view[machine] = MemberReport(alive=machine in members or pending, failed_ranks=failed)
        # Hangs are detected by each agent on its own machine and reported as failed ranks.
        return classify(time.monotonic(), view, math.inf, 0.0)

    def _decide(self, leadership: Leadership, generation: int, incident: Incident) -> None:
        statuses = self._plane.statuses()
        kind = incident.kind.value
        if incident.kind is IncidentKind.SOFTWARE and any(
            statuses.get(m, {}).get("hang") for m in incident.machines
        ):
            kind = IncidentKind.HANG.value
        if incident.kind is IncidentKind.MACHINE:
            # Seen on this tick: the lease just expired (the lost machine's last report is older).
            detected = time.time()
        else:
            reported = [
                statuses[m].get("at")
                for m in incident.machines
                if m in statuses and statuses[m].get("failed_ranks")
            ]
            detected = min((t for t in reported if t), default=time.time())
        record: dict[str, Any] = {
            "kind": kind,
            "reason": incident.reason,
            "machines": list(incident.machines),
            "ranks": list(incident.ranks),
            "replace": list(incident.replace),
            "previous": generation,
            "detected_at": detected,
            "decided_at": time.time(),
            "root": self._config.machine,
        }
        # Only generations that got a plan count: one superseded before its plan (a software
        # failure that turns out to be a lost machine once its lease expires) restarted nothing.
        if self._plane.planned_restarts(generation) >= self._config.max_restarts:
            reason = (
                f"{kind}: {incident.reason}; restart limit reached (--max-restarts "
                f"{self._config.max_restarts})"
            )
            self._plane.fail_job(leadership, reason)
            self._events.emit(events.JOB_FINISHED, status="failed", reason=reason)
            return
        if self._plane.advance_generation(leadership, generation, record, incident.replace):
            log.warning("root: generation %d for %s: %s", generation + 1, kind, incident.reason)
            self._events.emit(events.INCIDENT, generation=generation + 1, **record)

    def _plan(self, leadership: Leadership, generation: int) -> None:
        if len(self._plane.members()) < self._config.machines:
            return  # a replacement has not joined yet
        inventories = self._coordinator.inventories_now(generation)
        if inventories is None:
            return
        persisted = self._persistent.inventory() if self._persistent is not None else None
        replicas = self._coordinator.replicas_now(generation)
        plan = plan_restore(generation, self._config.world_size, inventories, persisted, replicas)
        store = TCPStoreKV.host(self._config.local_addr, 0)
        published = self._plane.publish_plan(
            leadership,
            generation,
            plan.to_dict(),
            {"addr": self._config.local_addr, "port": store.port},
        )
        if not published:
            return
        # The previous generation's rendezvous store goes; this one serves its workers.
        self._worker_store = store
        with contextlib.suppress(CoordinationError):
            self._plane.record_timeline(
                generation,
                None,
                {
                    "planned_at": time.time(),
                    "step": plan.step,
                    "plan_reason": plan.reason,
                    "sources": {str(r): s for r, s in plan.sources.items()},
                },
            )
        self._events.emit(
            events.PLAN_DECIDED, generation=generation, step=plan.step, reason=plan.reason
        )
