"""Scenario parameters: small frozen dataclasses, validated on construction.

Every number the wasted-time model uses is a field here; nothing is hidden in a formula. The
defaults are the paper's GPT-2 100B setting on 16 p4d.24xlarge machines (`reference/gemini-paper.md`
§4), so `Scenario()` is the paper's scenario at the OPT-175B failure rate of 1.5 % of machines per
day. Units: seconds, gigabits per second (Gbps, 1e9 bit/s), gigabytes (GB, 1e9 bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gemini_ckpt.errors import SimulationError

DAY_S = 86_400.0
HOUR_S = 3_600.0


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise SimulationError(f"{name} must be a positive number, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise SimulationError(f"{name} must be >= 0, got {value!r}")


def _fraction(name: str, value: float) -> None:
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise SimulationError(f"{name} must be within 0..1, got {value!r}")


@dataclass(frozen=True)
class ModelSpec:
    """The model whose training state is checkpointed.

    Attributes:
        parameters: Number of model parameters.
        bytes_per_parameter: Checkpoint bytes per parameter: 12 for fp32 master weights plus Adam's
            two moments (the paper's accounting).
    """

    parameters: float = 100e9
    bytes_per_parameter: float = 12.0

    def __post_init__(self) -> None:
        _positive("parameters", self.parameters)
        _positive("bytes_per_parameter", self.bytes_per_parameter)

    @property
    def checkpoint_bytes(self) -> float:
        """Bytes of one full checkpoint of the job (all machines together)."""
        return self.parameters * self.bytes_per_parameter


@dataclass(frozen=True)
class ClusterSpec:
    """The machines and the bandwidths checkpoints travel over.

    Attributes:
        machines: N, training machines.
        gpus_per_machine: GPUs per machine (only reported; checkpoints are counted per machine).
        cpu_memory_gb: Host memory per machine, GB (the default budget for replicas).
        network_gbps: Per-machine bandwidth of the training network, Gbps.
        network_efficiency: Fraction of `network_gbps` checkpoint traffic achieves (0.85 measured).
        storage_gbps: Aggregate bandwidth to remote persistent storage, Gbps.
    """

    machines: int = 16
    gpus_per_machine: int = 8
    cpu_memory_gb: float = 1152.0
    network_gbps: float = 400.0
    network_efficiency: float = 0.85
    storage_gbps: float = 20.0

    def __post_init__(self) -> None:
        if self.machines < 1:
            raise SimulationError(f"machines must be >= 1, got {self.machines}")
        if self.gpus_per_machine < 1:
            raise SimulationError(f"gpus_per_machine must be >= 1, got {self.gpus_per_machine}")
        _positive("cpu_memory_gb", self.cpu_memory_gb)
        _positive("network_gbps", self.network_gbps)
        _positive("storage_gbps", self.storage_gbps)
        if not 0 < self.network_efficiency <= 1:
            raise SimulationError(
                f"network_efficiency must be within (0, 1], got {self.network_efficiency}"
            )


@dataclass(frozen=True)
class TrainingSpec:
    """The training loop.

    Attributes:
        iteration_s: T_iter, seconds per training iteration (62 s for GPT-2 100B).
        idle_network_s: Network-idle time per iteration that checkpoint traffic can use without
            slowing training (10 s measured for GPT-2 100B). 0 means unknown: assume the
            traffic fits one iteration.
        snapshot_blocking_s: Training time one in-memory checkpoint blocks (0 when the copy is fully
            overlapped; set it from a snapshot benchmark).
    """

    iteration_s: float = 62.0
    idle_network_s: float = 10.0
    snapshot_blocking_s: float = 0.0

    def __post_init__(self) -> None:
        _positive("iteration_s", self.iteration_s)
        _non_negative("idle_network_s", self.idle_network_s)
        _non_negative("snapshot_blocking_s", self.snapshot_blocking_s)


@dataclass(frozen=True)
class FailureSpec:
    """How machines fail.

    Attributes:
        per_machine_per_day: Independent failures per machine per day (Poisson); OPT-175B saw about
            1.5 % of machines fail per day.
        hardware_fraction: Fraction of failures that lose the machine and its CPU memory; the rest
            are software failures after which the machine's memory survives. The paper's Figure 15
            counts software failures only.
        domain_size: Machines per failure domain (rack, switch); machine i is in domain
            i // domain_size. 0 means no domains.
        domain_failures_per_day: Correlated events per domain per day; each one takes down every
            machine of the domain at once (hardware).
    """

    per_machine_per_day: float = 0.015
    hardware_fraction: float = 0.0
    domain_size: int = 0
    domain_failures_per_day: float = 0.0

    def __post_init__(self) -> None:
        _non_negative("per_machine_per_day", self.per_machine_per_day)
        _fraction("hardware_fraction", self.hardware_fraction)
        _non_negative("domain_failures_per_day", self.domain_failures_per_day)
        if self.domain_size < 0:
            raise SimulationError(f"domain_size must be >= 0, got {self.domain_size}")
        if self.domain_failures_per_day > 0 and self.domain_size == 0:
            raise SimulationError("domain_failures_per_day > 0 needs domain_size >= 1")


@dataclass(frozen=True)
class RecoveryTimes:
    """The phases of one recovery, in the order they happen (seconds).

    Attributes:
        detection_s: From the failure until it is noticed (15 s measured).
        serialization_s: Writing in-memory checkpoints to files before restarting (162 s in the
            paper's prototype; our design restores from memory directly, i.e. 0).
        replacement_s: Getting a replacement machine after a hardware failure (4-7 min from the
            auto-scaling group; 0 with standby machines).
        restart_s: Restarting the job and warming up until training resumes (253 s measured).
    """

    detection_s: float = 15.0
    serialization_s: float = 0.0
    replacement_s: float = 0.0
    restart_s: float = 253.0

    def __post_init__(self) -> None:
        for name in ("detection_s", "serialization_s", "replacement_s", "restart_s"):
            _non_negative(name, getattr(self, name))


def _paper_gemini_recovery() -> RecoveryTimes:
    return RecoveryTimes(detection_s=15.0, serialization_s=162.0, restart_s=253.0)


def _paper_baseline_recovery() -> RecoveryTimes:
    # The notebook charges the remote-storage baselines a flat 6 min restart per failure.
    return RecoveryTimes(detection_s=0.0, serialization_s=0.0, restart_s=360.0)


@dataclass(frozen=True)
class GeminiSpec:
    """Gemini's settings.

    Attributes:
        replicas: m, copies of each checkpoint in CPU memory (the machine's own included).
        placement: `mixed` (group placement when m | N), `group` or `ring`.
        domain_aware: Spread each group over distinct failure domains.
        interval_iterations: Iterations between in-memory checkpoints; 0 means the smallest that
            fits the checkpoint traffic into the idle network time.
        persistent_interval_s: How often Gemini also writes to remote storage (3 h).
        peer_retrieval_s: Measured time to restore a machine from a peer's memory; None computes
            it from the checkpoint size and the network bandwidth.
        recovery: Recovery phases; the default is the paper's prototype (15 + 162 + 253 s).
    """

    replicas: int = 2
    placement: str = "mixed"
    domain_aware: bool = False
    interval_iterations: int = 0
    persistent_interval_s: float = 3 * HOUR_S
    peer_retrieval_s: float | None = None
    recovery: RecoveryTimes = field(default_factory=_paper_gemini_recovery)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise SimulationError(f"replicas must be >= 1, got {self.replicas}")
        if self.placement not in ("mixed", "group", "ring"):
            raise SimulationError(f"placement must be mixed, group or ring, got {self.placement!r}")
        if self.interval_iterations < 0:
            raise SimulationError(
                f"interval_iterations must be >= 0, got {self.interval_iterations}"
            )
        _positive("persistent_interval_s", self.persistent_interval_s)
        if self.peer_retrieval_s is not None:
            _non_negative("peer_retrieval_s", self.peer_retrieval_s)


@dataclass(frozen=True)
class BaselineSpec:
    """The remote-storage baselines.

    Attributes:
        strawman_interval_s: Strawman's checkpoint interval (3 h, as BLOOM).
        highfreq_blocking_s: Blocking serialisation before each HighFreq upload (80 s).
        align_to_iterations: Round HighFreq's interval up to whole iterations
            (ceil(t_ckpt / T_iter) iterations, the paper's definition); the paper's notebook does
            not (interval = t_ckpt), which is what Figure 15 uses.
        recovery: Recovery phases; the default is the notebook's flat 6 min restart.
    """

    strawman_interval_s: float = 3 * HOUR_S
    highfreq_blocking_s: float = 80.0
    align_to_iterations: bool = False
    recovery: RecoveryTimes = field(default_factory=_paper_baseline_recovery)

    def __post_init__(self) -> None:
        _positive("strawman_interval_s", self.strawman_interval_s)
        _non_negative("highfreq_blocking_s", self.highfreq_blocking_s)


@dataclass(frozen=True)
class Scenario:
    """Everything the analytic model, the Monte Carlo simulator and the recommender read."""

    model: ModelSpec = field(default_factory=ModelSpec)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    failures: FailureSpec = field(default_factory=FailureSpec)
    gemini: GeminiSpec = field(default_factory=GeminiSpec)
    baselines: BaselineSpec = field(default_factory=BaselineSpec)

    def __post_init__(self) -> None:
        if self.gemini.replicas > self.cluster.machines:
            raise SimulationError(
                f"m={self.gemini.replicas} replicas need at least {self.gemini.replicas} "
                f"machines, got N={self.cluster.machines}"
            )

    @property
    def checkpoint_bytes_per_machine(self) -> float:
        """Bytes of one machine's share of the checkpoint."""
        return self.model.checkpoint_bytes / self.cluster.machines

    @property
    def failures_per_day(self) -> float:
        """Failure incidents per day in the whole cluster (a domain event counts once)."""
        f = self.failures
        domains = math.ceil(self.cluster.machines / f.domain_size) if f.domain_size else 0
        return self.cluster.machines * f.per_machine_per_day + domains * f.domain_failures_per_day

    def domains(self) -> tuple[str, ...] | None:
        """Failure-domain label of each machine, or None without domains."""
        size = self.failures.domain_size
        if not size:
            return None
        return tuple(f"d{machine // size}" for machine in range(self.cluster.machines))
