"""The machine's trainer processes: started with torchrun's environment, watched, stopped.

Process creation, log redirection and the SIGTERM-then-SIGKILL shutdown come from
`torch.distributed.elastic.multiprocessing`; this module adds the environment contract, a poll that
does not tear the group down by itself (the agent decides when, after in-flight saves commit), and a
description of how each worker ended.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std, start_processes
from torch.distributed.elastic.multiprocessing.api import PContext

from gemini_ckpt import config as cfg
from gemini_ckpt.store.local_store import LocalStore

log = logging.getLogger(__name__)


class GroupState(str, Enum):
    """How the worker group is doing."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class WorkerExit:
    """How one worker ended."""

    rank: int
    local_rank: int
    pid: int
    exitcode: int

    def describe(self) -> str:
        """E.g. `rank 1 (pid 4242) was killed by SIGKILL`."""
        if self.exitcode < 0:
            try:
                name = signal.Signals(-self.exitcode).name
            except ValueError:
                name = f"signal {-self.exitcode}"
            return f"rank {self.rank} (pid {self.pid}) was killed by {name}"
        return f"rank {self.rank} (pid {self.pid}) exited with code {self.exitcode}"


@dataclass(frozen=True)
class Rendezvous:
    """Where the workers of one generation meet (a fresh TCPStore per generation)."""

    generation: int
    addr: str
    port: int


def worker_env(config: cfg.AgentConfig, local_rank: int, rdzv: Rendezvous) -> dict[str, str]:
    """The environment of one worker: torchrun's variables plus the way to reach this agent."""
    rank = config.ranks[local_rank]
    return {
        "LOCAL_RANK": str(local_rank),
        "RANK": str(rank),
        "GROUP_RANK": str(config.machine),
        "ROLE_RANK": str(rank),
        "ROLE_NAME": "default",
        "LOCAL_WORLD_SIZE": str(config.nproc_per_machine),
        "WORLD_SIZE": str(config.world_size),
        "GROUP_WORLD_SIZE": str(config.machines),
        "ROLE_WORLD_SIZE": str(config.world_size),
        "MASTER_ADDR": rdzv.addr,
        "MASTER_PORT": str(rdzv.port),
        # The store is fresh for every generation and hosted by the leader agent, so every worker
        # joins it as a client and no worker ever reads a dead generation's addresses.
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RESTART_COUNT": str(rdzv.generation),
        "TORCHELASTIC_MAX_RESTARTS": str(config.max_restarts),
        "TORCHELASTIC_RUN_ID": config.job_id,
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "OMP_NUM_THREADS": cfg.env_default("OMP_NUM_THREADS", "1") or "1",
        "PYTHONUNBUFFERED": "1",
        cfg.ENV_AGENT_SOCKET: str(config.socket_path),
        cfg.ENV_SNAPSHOT_MODE: config.snapshot_mode,
        "GEMINI_MACHINE": str(config.machine),
        cfg.ENV_PROFILE: config.interleave.profile().to_env() if config.interleave else "",
    }


class WorkerGroup:
    """The trainer processes of one generation on this machine."""

    def __init__(self, config: cfg.AgentConfig, log_dir: Path) -> None:
        self._config = config
        self._log_dir = log_dir
        self._context: PContext | None = None
        self._logs: DefaultLogsSpecs | None = None

    def start(self, rdzv: Rendezvous) -> None:
        """Start `nproc_per_machine` workers for `rdzv.generation`."""
        nproc = self._config.nproc_per_machine
        script, *args = self._config.command
        if self._logs is None:
            # One log tree per job: <log_dir>/<job>_*/attempt_<generation>/<local_rank>/std*.log
            self._logs = DefaultLogsSpecs(
                log_dir=str(self._log_dir),
                redirects=Std.ALL,
                tee=Std.ALL if self._config.tee else Std.NONE,
            )
        self._context = start_processes(
            name=f"gemini-{self._config.job_id}",
            entrypoint=sys.executable,
            args={i: ("-u", script, *args) for i in range(nproc)},
            envs={i: worker_env(self._config, i, rdzv) for i in range(nproc)},
            logs_specs=self._logs,
            log_line_prefixes={i: f"[rank{self._config.ranks[i]}]: " for i in range(nproc)},
        )

    def pids(self) -> dict[int, int]:
        """Local rank -> process id."""
        return dict(self._context.pids()) if self._context else {}

    def poll(self) -> tuple[GroupState, list[WorkerExit]]:
        """The group's state and the workers that failed, without stopping anything."""
        if self._context is None:
            return GroupState.SUCCEEDED, []
        handlers = self._context.subprocess_handlers  # type: ignore[attr-defined]
        codes = {local: h.proc.poll() for local, h in handlers.items()}
        failures = [
            WorkerExit(self._config.ranks[local], local, handlers[local].proc.pid, code)
            for local, code in sorted(codes.items())
            if code not in (None, 0)
        ]
        if failures:
            return GroupState.FAILED, failures
        if all(code == 0 for code in codes.values()):
            return GroupState.SUCCEEDED, []
        return GroupState.RUNNING, []

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM every worker still running, SIGKILL what is left after `timeout_s`."""
        if self._context is not None:
            for pid in self._context.pids().values():
                # A stopped (hung) process receives nothing until it is continued.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            self._context.close(death_sig=signal.SIGTERM, timeout=max(1, int(timeout_s)))
            self._context = None

    def stderr_tail(self, local_rank: int, lines: int = 20) -> str:
        """The last lines a worker wrote to stderr in this generation (for error reports)."""
        if self._context is None:
            return ""
        path = self._context.stderrs.get(local_rank)
        if not path:
            return ""
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def stop_after_saves(workers: WorkerGroup, store: LocalStore, ranks: range, grace_s: float) -> None:
    """Let saves already under way commit (for at most `grace_s`), then stop every worker.

    A write still open after that is torn: its slot is discarded.
    """
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if all(store.writing_step(r) is None for r in ranks):
            break
        time.sleep(0.01)
    workers.stop()
    for rank in ranks:
        step = store.abort_writes(rank)
        if step is not None:
            log.warning(
                "rank %d was stopped while writing step %d; that slot is discarded", rank, step
            )
