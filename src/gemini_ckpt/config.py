"""Configuration: small frozen dataclasses validated on construction.

This is the only module that reads environment variables. Every command-line flag has a `GEMINI_*`
twin (see `env_default`), and the trainer side finds its agent through the variables the agent sets
for the worker processes it starts (`TrainerConfig.from_env`).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemini_ckpt.errors import ConfigError
from gemini_ckpt.interleave.settings import InterleaveSettings, ProfileSettings

# Environment contract between the agent and the trainer processes it starts.
ENV_AGENT_SOCKET = "GEMINI_AGENT_SOCKET"
ENV_SNAPSHOT_MODE = "GEMINI_SNAPSHOT_MODE"
ENV_COPY_THREADS = "GEMINI_COPY_THREADS"
ENV_COPY_NICE = "GEMINI_COPY_NICE"
ENV_CHUNK_SIZE = "GEMINI_CHUNK_SIZE"
ENV_REQUEST_TIMEOUT = "GEMINI_REQUEST_TIMEOUT"
ENV_PROFILE = "GEMINI_PROFILE"
"""Set when the agent interleaves replication: the trainer profiles its collectives."""

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}

SNAPSHOT_MODES = ("overlapped", "sync")

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)$")
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}


def parse_size(text: str) -> int:
    """Parse a byte size such as `512MiB`, `8GiB`, `1.5GB` or `4096`.

    Raises:
        ConfigError: the text is not a size.
    """
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(f"not a byte size: {text!r} (examples: 4096, 512MiB, 8GiB, 1.5GB)")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    binary = "i" in unit
    prefix = unit[:1] if unit[:1] in "kmgt" else ""
    scale = 1024 ** "_kmgt".index(prefix) if binary and prefix else _UNITS[prefix]
    return int(number * scale)


def parse_rate(text: str) -> int:
    """A link rate in tc's notation (`200mbit`, `1gbit`, `1.5gbit`) as bits per second.

    Raises:
        ConfigError: not a number followed by bit, kbit, mbit, gbit or tbit, or below 1 kbit/s.
    """
    match = _RATE.match(text.strip().lower())
    if match is None:
        raise ConfigError(
            f"--link-bandwidth {text!r} is not a rate: expected a number followed by bit, kbit, "
            "mbit, gbit or tbit (decimal units, as tc uses), e.g. 200mbit or 1gbit"
        )
    bits = int(float(match.group(1)) * _RATE_UNITS[match.group(2)])
    if bits < 1000:
        raise ConfigError(f"--link-bandwidth {text!r} is below the 1kbit minimum")
    return bits


def format_size(nbytes: float) -> str:
    """Render a byte count with a binary unit, e.g. `1.50 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.2f} TiB"


def env_default(name: str, fallback: str | None = None) -> str | None:
    """The value of the `GEMINI_*` twin of a command-line flag, or `fallback`."""
    return os.environ.get(name, fallback)


def env_or(name: str, fallback: str) -> str:
    """A command-line flag's default: its `GEMINI_<NAME>` environment twin, or `fallback`.

    Defaults stay strings: argparse converts them with the option's `type`, so a bad value in the
    environment is reported like a bad flag.
    """
    return env_default(f"GEMINI_{name}", fallback) or fallback


def default_copy_threads() -> int:
    """Copy threads per trainer: at most two; more threads only fight over memory bandwidth."""
    return max(1, min(2, os.cpu_count() or 1))


@dataclass(frozen=True)
class TrainerConfig:
    """What a trainer process needs to reach its machine agent and to snapshot its state."""

    agent_socket: Path
    rank: int
    local_rank: int
    world_size: int
    generation: int = 0
    snapshot_mode: str = "overlapped"
    copy_threads: int = field(default_factory=default_copy_threads)
    copy_nice: int = 10
    """Nice value of the copy threads: the snapshot yields the CPU to training's own threads
    (collectives, data loading) when both want it (0: same priority as training)."""
    chunk_size: int = 4 << 20
    request_timeout_s: float = 600.0
    profile: ProfileSettings | None = None
    """Profile the network idle time of iterations for the agent (None: the agent does not
    interleave its traffic)."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.snapshot_mode not in SNAPSHOT_MODES:
            raise ConfigError(
                f"snapshot mode {self.snapshot_mode!r} is not one of {', '.join(SNAPSHOT_MODES)}"
            )
        if self.copy_threads < 1:
            raise ConfigError(f"copy threads must be >= 1, got {self.copy_threads}")
        if not 0 <= self.copy_nice <= 19:
            raise ConfigError(f"copy nice must be between 0 and 19, got {self.copy_nice}")
        if self.chunk_size < 4096 or self.chunk_size % 64:
            raise ConfigError(
                f"chunk size must be >= 4096 and a multiple of 64, got {self.chunk_size}"
            )
        if self.request_timeout_s <= 0:
            raise ConfigError(f"request timeout must be > 0, got {self.request_timeout_s}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TrainerConfig:
        """Build the trainer configuration from the variables the agent set for this process.

        Raises:
            ConfigError: the process was not started by a Gemini agent, or a variable is invalid.
        """
        env = os.environ if environ is None else environ
        socket_path = env.get(ENV_AGENT_SOCKET)
        if not socket_path:
            raise ConfigError(
                f"no Gemini agent found: {ENV_AGENT_SOCKET} is not set. Start the training script "
                "with `gemini-ckpt launch` (torchrun-style options) or `gemini-ckpt local`."
            )
        try:
            return cls(
                agent_socket=Path(socket_path),
                rank=int(env.get("RANK", "0")),
                local_rank=int(env.get("LOCAL_RANK", "0")),
                world_size=int(env.get("WORLD_SIZE", "1")),
                generation=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
                snapshot_mode=env.get(ENV_SNAPSHOT_MODE, "overlapped"),
                copy_threads=int(env.get(ENV_COPY_THREADS, str(default_copy_threads()))),
                copy_nice=int(env.get(ENV_COPY_NICE, "10")),
                chunk_size=parse_size(env.get(ENV_CHUNK_SIZE, str(4 << 20))),
                request_timeout_s=float(env.get(ENV_REQUEST_TIMEOUT, "600")),
                profile=_profile_from_env(env),
            )
        except ValueError as e:
            raise ConfigError(f"invalid Gemini environment for this trainer: {e}") from e


def _profile_from_env(env: Mapping[str, str]) -> ProfileSettings | None:
    text = env.get(ENV_PROFILE, "")
    return ProfileSettings.from_env(text) if text else None


@dataclass(frozen=True)
class AgentConfig:
    """Everything one machine agent needs; built by the `launch` and `local` commands."""

    job_id: str
    machine: int
    machines: int
    nproc_per_machine: int
    command: tuple[str, ...]
    """The worker command line (the Python interpreter, the script and its arguments)."""
    store_addr: str
    store_port: int
    host_store: bool
    run_dir: Path
    shm_dir: Path
    memory_limit: int
    max_restarts: int = 3
    snapshot_mode: str = "overlapped"
    stop_grace_s: float = 10.0
    """How long a stopping worker may take to commit a save it has under way."""
    join_timeout_s: float = 300.0
    commit_wait_timeout_s: float = 300.0
    """Longest a save waits for the other ranks (shorter than a trainer's request timeout)."""
    tee: bool = False
    faults: tuple[Any, ...] = ()
    """`ResolvedFault`s whose rank lives on this machine."""
    persist_dir: Path | str | None = None
    """Root of the persistent tier (shared by all machines of the job): a directory or an fsspec
    URL; None: no persistent tier."""
    persist_every_steps: int = 0
    persist_every_s: float = 0.0
    persist_keep: int = 2
    hang_timeout_s: float = 600.0
    """A generation in which no step completes for this long is hung: its workers are restarted."""
    startup_timeout_s: float = 600.0
    """How long a generation's first step may take (starting Python, importing torch, restoring):
    kept apart from `hang_timeout_s` so a tight hang deadline does not mistake a slow start-up on a
    busy host for a hang."""
    member_ttl_s: int = 5
    """Membership lease TTL: a machine whose agent is silent this long is declared failed."""
    local_addr: str = "127.0.0.1"
    """The address other machines reach this agent at (the root hosts the workers' rendezvous)."""
    replicas: int = 2
    """m: copies of each machine's checkpoint in CPU memory, its own included (clipped to the
    number of machines; 1 turns replication off)."""
    replica_port: int = 0
    """TCP port of this agent's replication server (0: any free port, published in etcd)."""
    job_secret_file: Path | None = None
    """File holding the job's secret that authenticates agents to each other (None: the
    GEMINI_JOB_SECRET variable, else one the agents share through etcd)."""
    interleave: InterleaveSettings | None = None
    """Send replicas only in the training network's idle time (None: as soon as committed)."""

    def __post_init__(self) -> None:
        self._check_replication()
        if not 0 <= self.machine < self.machines:
            raise ConfigError(f"machine index {self.machine} is outside 0..{self.machines - 1}")
        if self.nproc_per_machine < 1:
            raise ConfigError(f"--nproc-per-node must be >= 1, got {self.nproc_per_machine}")
        if not self.command:
            raise ConfigError("no training script given")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if self.snapshot_mode not in SNAPSHOT_MODES:
            raise ConfigError(
                f"snapshot mode {self.snapshot_mode!r} is not one of {SNAPSHOT_MODES}"
            )
        if self.persist_every_steps < 0 or self.persist_every_s < 0 or self.persist_keep < 1:
            raise ConfigError(
                f"--persist-every {self.persist_every_steps}, --persist-interval "
                f"{self.persist_every_s} and --persist-keep {self.persist_keep} must be "
                ">= 0, >= 0 and >= 1"
            )
        if self.persist_dir is None and (self.persist_every_steps or self.persist_every_s):
            raise ConfigError("--persist-every/--persist-interval need --persist-dir")
        if self.member_ttl_s < 1:
            raise ConfigError(f"--member-ttl must be >= 1 s, got {self.member_ttl_s}")
        for flag, value in (
            ("--hang-timeout", self.hang_timeout_s),
            ("--startup-timeout", self.startup_timeout_s),
            ("--memory-limit", self.memory_limit),
        ):
            if value <= 0:
                raise ConfigError(f"{flag} must be positive, got {value}")
        if len(str(self.socket_path)) > 100:
            raise ConfigError(
                f"agent socket path {self.socket_path} is longer than a Unix socket allows; "
                "use a shorter --run-dir"
            )

    def _check_replication(self) -> None:
        if self.replicas < 1:
            raise ConfigError(
                f"--replicas must be >= 1 (the machine's own copy counts), got {self.replicas}"
            )
        if not 0 <= self.replica_port < 65536:
            raise ConfigError(f"--replica-port must be in 0..65535, got {self.replica_port}")

    @property
    def world_size(self) -> int:
        """Ranks in the job."""
        return self.machines * self.nproc_per_machine

    @property
    def effective_replicas(self) -> int:
        """The m in use: a job cannot hold more copies than it has machines."""
        return min(self.replicas, self.machines)

    @property
    def ranks(self) -> range:
        """The global ranks that run on this machine."""
        first = self.machine * self.nproc_per_machine
        return range(first, first + self.nproc_per_machine)

    @property
    def machine_dir(self) -> Path:
        """This machine's directory in the run directory (events, logs, socket)."""
        return self.run_dir / f"m{self.machine}"

    @property
    def socket_path(self) -> Path:
        """Where the agent listens for its trainers."""
        return self.machine_dir / "agent.sock"


def default_memory_limit() -> int:
    """Half of what /dev/shm can hold: the rest stays for the training processes themselves."""
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return 8 << 30
    return max(1 << 30, stats.f_bsize * stats.f_blocks // 2)


def job_secret_from_env() -> str:
    """The job secret given in the environment (GEMINI_JOB_SECRET), or ""."""
    return os.environ.get("GEMINI_JOB_SECRET", "")


def shm_root() -> Path:
    """Where machine agents put their checkpoint memory."""
    return Path(os.environ.get("GEMINI_SHM_DIR", "/dev/shm"))


def use_torch_extensions_dir() -> Path:
    """Where PyTorch (and DeepSpeed) cache the ops they compile: `TORCH_EXTENSIONS_DIR`.

    Left alone when set; otherwise set, for this process and those it starts, to
    `<python environment>/torch-extensions`, so compiled ops survive `~/.cache` being cleared
    and every process of an environment shares them (a cold compile takes ~40 s per op).
    """
    default = Path(sys.prefix) / "torch-extensions"
    return Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(default)))


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment plus `extra`, for processes it starts."""
    return {**os.environ, **extra}


def parse_endpoints(text: str) -> tuple[str, ...]:
    """Parse `HOST:PORT[,HOST:PORT...]` (the `--etcd` flag) into a tuple of `host:port` strings.

    Raises:
        ConfigError: an entry has no host, or its port is not an integer in 1..65535.
    """
    endpoints = []
    for raw in text.split(","):
        entry = raw.strip().removeprefix("http://")
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"not an etcd endpoint: {raw.strip()!r} (expected HOST:PORT[,...])")
        endpoints.append(f"{host}:{int(port)}")
    return tuple(endpoints)


@dataclass(frozen=True)
class EtcdClientConfig:
    """How to reach an etcd cluster (v3 API over gRPC, plain text).

    `request_timeout_s` bounds every call that is not given its own timeout. One call tries the
    endpoints in turn; `attempt_timeout_s` bounds the time spent on one endpoint before the next
    is tried, so a member that is alive but cut off from the others costs at most that much.
    """

    endpoints: tuple[str, ...]
    request_timeout_s: float = 5.0
    attempt_timeout_s: float = 1.0
    connect_timeout_s: float = 3.0
    """How long `start()` waits for one endpoint to answer before giving up."""

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ConfigError("no etcd endpoints given")
        parse_endpoints(",".join(self.endpoints))
        for name in ("request_timeout_s", "attempt_timeout_s", "connect_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"etcd {name} must be > 0, got {getattr(self, name)}")
