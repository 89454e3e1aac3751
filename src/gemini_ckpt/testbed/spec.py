"""What a test bed run is asked to do: the job, its faults and the network it runs on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gemini_ckpt.errors import ConfigError
from gemini_ckpt.faults import ETCD_KINDS, parse_fault, resolve_faults
from gemini_ckpt.testbed import netns

# The private etcd's timings: etcd's defaults. On a few busy cores, shorter election timeouts make
# the leader flap while trainers start, and requests time out.
ETCD_HEARTBEAT_MS = 100
ETCD_ELECTION_MS = 1000
# After its leader dies, a cluster answers nothing for up to two election timeouts (the randomized
# wait) plus a vote; a lease refreshed every TTL/3 must outlive that from its last refresh.
_TTL_PER_ELECTION = 4


@dataclass(frozen=True)
class LocalSpec:
    """What to run on the test bed."""

    machines: int
    nproc_per_machine: int
    script: Path
    script_args: tuple[str, ...] = ()
    faults: tuple[str, ...] = ()
    fault_seed: int = 0
    memory_limit: str = ""
    snapshot_mode: str = "overlapped"
    max_restarts: int = 3
    stop_grace_s: float = 10.0
    tee: bool = False
    run_dir: Path | None = None
    job_id: str = ""
    persist_dir: Path | str | None = None
    persist_every: int = 0
    persist_interval_s: float = 0.0
    hang_timeout_s: float = 600.0
    startup_timeout_s: float = 600.0
    member_ttl_s: int = 5
    etcd_members: int = 1
    """Members of the private etcd the test bed starts (3: a cluster that survives losing one)."""
    etcd: str = ""
    """An existing etcd cluster (HOST:PORT,...); empty: start a private one for the job."""
    standby: int = 0
    """Warm standby agents kept waiting to replace lost machines (started ahead of need)."""
    replicas: int = 2
    """m: copies of each machine's checkpoint in CPU memory (see `AgentConfig.replicas`)."""
    env: dict[str, str] = field(default_factory=dict)
    netns: bool = False
    """Each machine in its own network namespace on one switch (root only; see `testbed.netns`)."""
    link_bandwidth: str = ""
    """Every machine's link rate each way, in tc notation (`1gbit`): with `netns` the cap, and the
    agents' cost model for interleaving; empty: no cap."""
    agent_args: tuple[str, ...] = ()
    """More `gemini-ckpt launch` options for every agent (the interleaving ones)."""

    def __post_init__(self) -> None:
        if self.machines < 1 or self.nproc_per_machine < 1:
            raise ConfigError(
                f"--machines and --nproc-per-machine must be >= 1, got {self.machines} and "
                f"{self.nproc_per_machine}"
            )
        if not self.script.is_file():
            raise ConfigError(f"training script {self.script} does not exist")
        if self.standby < 0:
            raise ConfigError(f"--standby must be >= 0, got {self.standby}")
        shortest_ttl_s = _TTL_PER_ELECTION * ETCD_ELECTION_MS / 1000
        if self.etcd_members > 1 and not self.etcd and self.member_ttl_s < shortest_ttl_s:
            raise ConfigError(
                f"--member-ttl {self.member_ttl_s} s is too short for a {self.etcd_members}-member "
                f"etcd: after losing its leader it answers nothing for up to "
                f"{2 * ETCD_ELECTION_MS / 1000:g} s, and every membership lease would expire; "
                f"use --member-ttl {shortest_ttl_s:g} or more"
            )
        netns.check_testbed_options(
            self.netns, self.machines, self.link_bandwidth, self.standby, self.etcd
        )
        # Surface a bad --fault before anything starts.
        faults = resolve_faults(
            [parse_fault(f) for f in self.faults],
            self.machines,
            self.nproc_per_machine,
            self.fault_seed,
            self.replicas,
        )
        for fault in (f for f in faults if f.kind in ETCD_KINDS):
            if self.etcd:
                raise ConfigError(f"fault {fault.name!r} needs the test bed's own etcd, not --etcd")
            if (fault.machine or 0) >= self.etcd_members:
                raise ConfigError(
                    f"fault {fault.name!r} names etcd member {fault.machine}; the test bed runs "
                    f"{self.etcd_members} (--etcd-members)"
                )
