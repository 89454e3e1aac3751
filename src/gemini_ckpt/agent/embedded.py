"""A machine agent's checkpoint service running inside the calling process, without workers.

For benchmarks and tests that drive a `Checkpointer` directly: the same store, service and control
socket as a real agent, a single machine, and a coordinator over an in-process KV.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from gemini_ckpt.agent.fault_injector import FaultInjector
from gemini_ckpt.agent.server import ControlServer
from gemini_ckpt.agent.service import TrainerService
from gemini_ckpt.agent.service_hooks import Connection, ServiceHooks
from gemini_ckpt.config import AgentConfig, TrainerConfig, shm_root
from gemini_ckpt.coordination.job import JobCoordinator
from gemini_ckpt.coordination.kv import MemoryKV
from gemini_ckpt.faults import ResolvedFault
from gemini_ckpt.observability.events import EventLog
from gemini_ckpt.recovery.plan import RestorePlan, plan_restore
from gemini_ckpt.store.local_store import LocalStore


class EmbeddedAgent:
    """Checkpoint service for `world_size` ranks of one machine; a context manager."""

    def __init__(
        self,
        world_size: int = 1,
        memory_limit: int = 8 << 30,
        faults: tuple[ResolvedFault, ...] = (),
        run_dir: Path | None = None,
    ) -> None:
        self._tmp = None if run_dir else tempfile.TemporaryDirectory(prefix="gemini-embedded-")
        root = run_dir or Path(self._tmp.name)  # type: ignore[union-attr]
        job = f"embedded-{root.name}"
        self.config = AgentConfig(
            job_id=job,
            machine=0,
            machines=1,
            nproc_per_machine=world_size,
            command=("embedded",),
            store_addr="",
            store_port=0,
            host_store=False,
            run_dir=root,
            shm_dir=shm_root() / f"gemini-{job}",
            memory_limit=memory_limit,
            faults=faults,
        )
        self.events = EventLog(root / "events.jsonl", machine=0)
        self.store = LocalStore(self.config.shm_dir, memory_limit)
        self.coordinator = JobCoordinator(MemoryKV(), job, machines=1)
        self.service = TrainerService(
            self.config,
            self.store,
            self.coordinator,
            FaultInjector(faults, self.events),
            self.events,
            ServiceHooks(timeline=self._record_timeline),
        )
        self.timeline: dict[int, dict[str, Any]] = {}
        """This machine's part of each generation's recovery timeline (etcd's copy, for a real
        agent)."""
        self.server = ControlServer(
            self.config.socket_path, self.service.handle, Connection, self.service.disconnected
        )
        self.generation = 0

    def start(self) -> EmbeddedAgent:
        """Create the store, open the socket and serve generation 0 as a fresh start."""
        self.events.start()
        self.store.start()
        self.service.start()
        self.server.start()
        self.service.open_generation(0, plan_restore(0, self.config.world_size, {}))
        return self

    def restart(self) -> RestorePlan:
        """Begin the next generation the way a real agent does after a failure; return its plan."""
        self.service.close_generation("restart")
        for rank in self.config.ranks:
            self.store.abort_writes(rank)
        self.generation += 1
        plan = plan_restore(self.generation, self.config.world_size, {0: self.store.inventory()})
        self.store.truncate_after(plan.step if plan.step is not None else -1)
        self.coordinator.publish_plan(self.generation, plan.to_dict(), {})
        self.service.open_generation(self.generation, plan)
        return plan

    def _record_timeline(self, generation: int, fields: dict[str, Any]) -> None:
        self.timeline[generation] = {**self.timeline.get(generation, {}), **fields}

    def trainer_config(self, rank: int = 0, **overrides: object) -> TrainerConfig:
        """The configuration a trainer of `rank` would get from this agent."""
        fields: dict[str, object] = {
            "agent_socket": self.config.socket_path,
            "rank": rank,
            "local_rank": rank,
            "world_size": self.config.world_size,
            "generation": self.generation,
        }
        fields.update(overrides)
        return TrainerConfig(**fields)  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop serving and release all checkpoint memory."""
        self.server.close()
        self.service.close()
        self.store.close()
        self.events.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> EmbeddedAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
