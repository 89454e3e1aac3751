"""The one-host test bed: N simulated machines, each an agent process with its own trainers.

Each machine has its own agent, shared-memory directory, control socket and ports, exactly as on a
real cluster; the test bed hosts the job store they coordinate through. Agents are started by
command line (`gemini-ckpt launch --join-store ...`), never imported, so what runs here is what runs
on a cluster.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gemini_ckpt import config as cfg
from gemini_ckpt.coordination.control import ControlPlane
from gemini_ckpt.coordination.etcd_kv import EtcdKV
from gemini_ckpt.coordination.etcd_server import EtcdServer, EtcdServerConfig
from gemini_ckpt.faults import ETCD_KINDS, parse_fault, resolve_faults
from gemini_ckpt.observability import events
from gemini_ckpt.observability.events import EventLog, read_events
from gemini_ckpt.observability.summary import RunSummary, summarize
from gemini_ckpt.testbed import netns
from gemini_ckpt.testbed.etcd_faults import EtcdFaults
from gemini_ckpt.testbed.event_tail import EventTail
from gemini_ckpt.testbed.operator import LocalProcessOperator
from gemini_ckpt.testbed.spec import ETCD_ELECTION_MS, ETCD_HEARTBEAT_MS, LocalSpec

__all__ = ["LocalSpec", "LocalTestbed"]
from gemini_ckpt.testbed.standby_pool import StandbyPool


class LocalTestbed:
    """`start()`, then `poll()` until it returns an exit code, then `close()`; a context manager."""

    def __init__(self, spec: LocalSpec) -> None:
        self.spec = spec
        self.job_id = spec.job_id or f"local-{int(time.time())}-{os.getpid()}"
        self.run_dir = spec.run_dir or Path(tempfile.mkdtemp(prefix="gemini-local-"))
        self._own_run_dir = spec.run_dir is None
        self._etcd: EtcdServer | None = None
        self._network: netns.ShapedNetwork | None = None
        self._etcd_endpoint = ""
        self._agents: dict[int, subprocess.Popen[bytes]] = {}
        self._kv: EtcdKV | None = None
        self._operator: LocalProcessOperator | None = None
        self._etcd_faults: EtcdFaults | None = None
        self._replaced: list[dict[str, Any]] = []
        self._standbys: StandbyPool | None = None
        self._standby_logs: dict[int, Path] = {}
        self._events = EventLog(self.run_dir / "testbed" / "events.jsonl", machine="testbed")
        self.tail = EventTail([self.event_file(m) for m in range(spec.machines)])

    def event_file(self, machine: int) -> Path:
        """Where machine `machine`'s agent writes its events."""
        return self.run_dir / f"m{machine}" / "events.jsonl"

    def agent_command(self, machine: int, etcd: str, standby: str = "") -> list[str]:
        """The command line that starts machine `machine`'s agent (or warm standby `standby`)."""
        spec, net = self.spec, self._network
        addr = net.address(machine) if net else "127.0.0.1"
        command = [
            sys.executable,
            "-m",
            "gemini_ckpt",
            "launch",
            "--join-store",
            "--nnodes",
            str(spec.machines),
            "--node-rank",
            str(machine),
            "--nproc-per-node",
            str(spec.nproc_per_machine),
            "--master-addr",
            addr,
            "--local-addr",
            addr,
            "--etcd",
            etcd,
            "--run-id",
            self.job_id,
            "--run-dir",
            str(self.run_dir),
            "--snapshot-mode",
            spec.snapshot_mode,
            "--max-restarts",
            str(spec.max_restarts),
            "--stop-grace",
            str(spec.stop_grace_s),
            "--fault-seed",
            str(spec.fault_seed),
            "--hang-timeout",
            str(spec.hang_timeout_s),
            "--startup-timeout",
            str(spec.startup_timeout_s),
            "--member-ttl",
            str(spec.member_ttl_s),
            "--replicas",
            str(spec.replicas),
            "--job-secret-file",
            str(self.run_dir / "job.secret"),
        ]
        if spec.memory_limit:
            command += ["--memory-limit", spec.memory_limit]
        if spec.tee:
            command.append("--tee")
        if spec.persist_dir is not None:
            command += [
                "--persist-dir",
                str(spec.persist_dir),
                "--persist-every",
                str(spec.persist_every),
                "--persist-interval",
                str(spec.persist_interval_s),
            ]
        if spec.link_bandwidth:
            command += ["--link-bandwidth", spec.link_bandwidth]
        command += spec.agent_args
        for fault in spec.faults:
            command += ["--fault", fault]
        if standby:
            command += ["--standby", standby]
        inside = net.exec_prefix(machine) if net else []  # trainers inherit the namespace
        return [*inside, *command, str(spec.script), *spec.script_args]

    def start(self) -> None:
        """Host the job store and start one agent process per machine."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # The agents authenticate each other with it; only this user may read it.
        fd = os.open(self.run_dir / "job.secret", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_hex(32).encode())
        if self.spec.netns:
            spec = netns.NetworkSpec(self.spec.machines, self.spec.link_bandwidth)
            self._network = netns.ShapedNetwork(spec).start()
        etcd = self.spec.etcd
        if not etcd:
            # The job's own etcd, as a real cluster would have one; gone with the job.
            host = self._network.host_address if self._network else "127.0.0.1"
            self._etcd = EtcdServer(
                EtcdServerConfig(
                    host,
                    members=self.spec.etcd_members,
                    heartbeat_ms=ETCD_HEARTBEAT_MS,
                    election_ms=ETCD_ELECTION_MS,
                )
            ).start()
            etcd = ",".join(self._etcd.endpoints)
            faults = resolve_faults(
                [parse_fault(f) for f in self.spec.faults],
                self.spec.machines,
                self.spec.nproc_per_machine,
                self.spec.fault_seed,
                self.spec.replicas,
            )
            self._events.start()
            self._etcd_faults = EtcdFaults(
                self._etcd,
                [f for f in faults if f.kind in ETCD_KINDS],
                self.event_file(0),
                self._events,
            )
            self._etcd_faults.start()
        self._etcd_endpoint = etcd
        for machine in range(self.spec.machines):
            self._launch(machine)
        self._kv = EtcdKV(cfg.EtcdClientConfig(cfg.parse_endpoints(etcd))).start()
        plane = ControlPlane(self._kv, self.job_id, self.spec.machines)
        self._standbys = StandbyPool(plane, self._spawn_standby, self.spec.standby)
        self._operator = LocalProcessOperator(plane, self._retire, self._launch)
        self._operator.start()

    def _launch(self, machine: int, generation: int = 0) -> dict[str, Any]:
        """Bring up machine `machine`'s agent: a waiting standby if one is ready, else a new one."""
        standby = self._take_standby(machine, generation)
        if standby is not None:
            return standby
        agent = self._spawn(self.agent_command(machine, self._etcd_endpoint), f"m{machine}")
        self._agents[machine] = agent
        return {"pid": agent.pid}

    def _spawn(self, command: list[str], log_dir: str) -> subprocess.Popen[bytes]:
        directory = self.run_dir / log_dir
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / "agent.log").open("ab") as log:
            return subprocess.Popen(
                command,
                env=cfg.child_env(
                    {**(self._network.env() if self._network else {}), **self.spec.env}
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _spawn_standby(self, name: str) -> tuple[subprocess.Popen[bytes], Path]:
        command = self.agent_command(0, self._etcd_endpoint, standby=name)
        process = self._spawn(command, f"standby-{name}")
        return process, self.run_dir / f"standby-{name}" / "agent.log"

    def _take_standby(self, machine: int, generation: int) -> dict[str, Any] | None:
        taken = self._standbys.take(machine, generation) if self._standbys is not None else None
        if taken is None:
            return None
        name, process, log_path = taken
        self._agents[machine] = process
        self._standby_logs[machine] = log_path
        return {"pid": process.pid, "standby": name}

    def _retire(self, machine: int) -> None:
        """Make sure nothing of machine `machine` survives: agent, trainers, shared memory."""
        agent = self._agents.get(machine)
        if agent is not None and agent.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
        started = [
            r
            for r in read_events([self.event_file(machine)])
            if r.get("event") == events.GENERATION_STARTED
        ]
        for pid in (started[-1].get("pids") or {}).values() if started else ():
            if _runs(int(pid), str(self.spec.script)):  # never a process that reused the pid
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(pid), signal.SIGKILL)
        shutil.rmtree(cfg.shm_root() / f"gemini-{self.job_id}" / f"m{machine}", ignore_errors=True)

    @property
    def replacements(self) -> list[dict[str, Any]]:
        """Machines the operator replaced, with timestamps (also after `close()`)."""
        return list(self._operator.replacements) if self._operator else list(self._replaced)

    @property
    def standbys_started(self) -> dict[str, float]:
        """When each warm standby was started (wall clock)."""
        return dict(self._standbys.started) if self._standbys is not None else {}

    def poll(self) -> int | None:
        """None while agents run; their worst exit code once all have ended."""
        codes = [agent.poll() for agent in self._agents.values()]
        if any(code is None for code in codes):
            return None
        return max(abs(c) for c in codes if c is not None)

    def wait(self, timeout_s: float) -> int:
        """Block until the agents end (or stop them after `timeout_s`); return the exit code."""
        deadline = time.monotonic() + timeout_s
        while (code := self.poll()) is None:
            if time.monotonic() > deadline:
                self.close()
                return 124
            time.sleep(0.1)
        return code

    def event_files(self) -> list[Path]:
        """Every events file of the run: each machine's and the test bed's own."""
        machines = [self.event_file(m) for m in range(self.spec.machines)]
        return [*machines, self.run_dir / "testbed" / "events.jsonl"]

    def summary(self) -> RunSummary:
        """The run's recovery summary, from all machines' events."""
        return summarize(read_events(self.event_files()))

    def agent_log(self, machine: int) -> str:
        """What machine `machine`'s agent printed (a standby that became it: its log too)."""
        paths = [self.run_dir / f"m{machine}" / "agent.log"]
        if machine in self._standby_logs:
            paths.append(self._standby_logs[machine])
        text = []
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                text.append(path.read_text(errors="replace"))
        return "".join(text)

    def close(self, grace_s: float = 15.0) -> None:
        """Stop agents still running (SIGTERM, then SIGKILL) and free the job's shared memory."""
        if self._operator is not None:
            self._operator.close()
            self._replaced = list(self._operator.replacements)
            self._operator = None
        if self._standbys is not None:
            self._standbys.close()
        if self._etcd_faults is not None:
            self._etcd_faults.close()
            self._etcd_faults = None
        self._events.close()
        processes = [*self._agents.values()]
        if self._standbys is not None:
            processes += self._standbys.waiting()
        for agent in processes:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for agent in processes:
            try:
                agent.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
        shutil.rmtree(cfg.shm_root() / f"gemini-{self.job_id}", ignore_errors=True)
        if self._kv is not None:
            self._kv.close()
            self._kv = None
        if self._etcd is not None:
            self._etcd.stop()
            self._etcd = None
        if self._network is not None:
            self._network.close()
            self._network = None

    def remove_run_dir(self) -> None:
        """Delete the run directory if the test bed created it."""
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> LocalTestbed:
        try:
            self.start()
        except BaseException:
            self.close()  # a half-started job must not leave etcd or namespaces behind
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _runs(pid: int, script: str) -> bool:
    """Whether process `pid` is running `script`."""
    try:
        return script.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
