"""The paper's wasted-time model (Eq. 1-2) for Gemini, Strawman and HighFreq, every input explicit.

Eq. 1: a failure wastes T_wasted = t_ckpt + 1/(2f) + t_rtvl (the checkpoint in flight, half an
interval on average, and the retrieval), plus the recovery phases (detection, serialisation,
replacement, restart), which the paper's Figure 15 adds. Eq. 2: 1/f >= max(t_ckpt, T_iter).

The effective training time ratio is the paper's first-order form: ratio = max(0, steady - F *
E[wasted per failure] / day), where `steady` is the fraction of time spent training without failures
(HighFreq's blocking serialisation lowers it) and F is failures per day. Beyond the paper, Gemini's
expectation mixes three outcomes: a software failure (restore from local memory), a hardware failure
recovered from a peer, and a hardware failure that finds a whole holder set lost within the recovery
window (falls back to the 3-hourly persistent checkpoint); the last one's probability is a first-
order estimate from the placement (see `group_loss_probability`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from gemini_ckpt.placement import Placement, place
from gemini_ckpt.sim.params import DAY_S, HOUR_S, RecoveryTimes, Scenario

GEMINI, STRAWMAN, HIGHFREQ = "gemini", "strawman", "highfreq"
STRATEGIES = (GEMINI, STRAWMAN, HIGHFREQ)


def eq1_wasted_s(checkpoint_s: float, interval_s: float, retrieval_s: float) -> float:
    """Eq. 1: average time a failure wastes, t_ckpt + 1/(2f) + t_rtvl (overheads excluded)."""
    return checkpoint_s + interval_s / 2 + retrieval_s


def eq2_min_interval_s(checkpoint_s: float, iteration_s: float) -> float:
    """Eq. 2: the shortest checkpoint interval 1/f = max(t_ckpt, T_iter)."""
    return max(checkpoint_s, iteration_s)


def transfer_s(nbytes: float, gbps: float, efficiency: float = 1.0) -> float:
    """Seconds to move `nbytes` at `gbps` (1e9 bit/s) times `efficiency`."""
    return nbytes * 8 / (gbps * 1e9 * efficiency)


def checkpoint_time_reduction(scenario: Scenario, replicas: int | None = None) -> float:
    """Figure 11: remote-storage checkpoint time over Gemini's, 0.85 B N / B_remote / (m - 1).

    Returns infinity for m = 1 (no checkpoint traffic at all).
    """
    m = scenario.gemini.replicas if replicas is None else replicas
    if m == 1:
        return math.inf
    return remote_checkpoint_s(scenario) / gemini_checkpoint_s(scenario, m)


def remote_checkpoint_s(scenario: Scenario) -> float:
    """t_ckpt to remote storage: the whole checkpoint over the aggregate storage bandwidth."""
    return transfer_s(scenario.model.checkpoint_bytes, scenario.cluster.storage_gbps)


def gemini_checkpoint_s(scenario: Scenario, replicas: int) -> float:
    """Network time for each machine to send its m-1 replicas (all machines send in parallel)."""
    c = scenario.cluster
    per_copy = transfer_s(
        scenario.checkpoint_bytes_per_machine, c.network_gbps, c.network_efficiency
    )
    return (replicas - 1) * per_copy


def peer_retrieval_s(scenario: Scenario) -> float:
    """Time for a replacement machine to fetch its checkpoint from a peer's memory (or measured)."""
    if scenario.gemini.peer_retrieval_s is not None:
        return scenario.gemini.peer_retrieval_s
    c = scenario.cluster
    return transfer_s(scenario.checkpoint_bytes_per_machine, c.network_gbps, c.network_efficiency)


@dataclass(frozen=True)
class StrategyTiming:
    """How one strategy checkpoints and recovers; the analytic model and the simulator read it.

    Attributes:
        name: `gemini`, `strawman` or `highfreq`.
        interval_s: Training time between checkpoint captures, 1/f.
        blocking_s: Training time each checkpoint stalls (serialisation, traffic that does not fit).
        checkpoint_s: t_ckpt, from capture until the checkpoint is complete and usable.
        retrieval_s: t_rtvl after a hardware failure (a peer's memory for Gemini, storage else).
        recovery: The recovery phases.
        in_memory: True for Gemini: software failures restore from local memory (no retrieval), and
            recovery needs a surviving holder for every machine.
        remote_retrieval_s: Gemini's retrieval from persistent storage when memory is lost.
        persistent_interval_s: Gemini's persistent checkpoint interval.
        persistent_checkpoint_s: Gemini's upload time of a persistent checkpoint.
        placement: Gemini's placement.
    """

    name: str
    interval_s: float
    blocking_s: float
    checkpoint_s: float
    retrieval_s: float
    recovery: RecoveryTimes
    in_memory: bool = False
    remote_retrieval_s: float = 0.0
    persistent_interval_s: float = 0.0
    persistent_checkpoint_s: float = 0.0
    placement: Placement | None = None

    @property
    def cycle_s(self) -> float:
        """Wall time between checkpoint captures."""
        return self.interval_s + self.blocking_s

    @property
    def steady_ratio(self) -> float:
        """Fraction of time training when nothing fails."""
        return self.interval_s / self.cycle_s

    @property
    def checkpoints_per_hour(self) -> float:
        """Checkpoints per hour of training, blocking excluded, as Figure 12 counts them."""
        return HOUR_S / self.interval_s

    @property
    def lost_s(self) -> float:
        """Eq. 1's progress lost per failure, t_ckpt + 1/(2f), without retrieval."""
        return self.checkpoint_s + self.interval_s / 2


@dataclass(frozen=True)
class Outcome:
    """One way a failure ends, with its probability and costs in seconds."""

    label: str
    probability: float
    lost_s: float
    retrieval_s: float
    downtime_s: float

    @property
    def wasted_s(self) -> float:
        """Everything this outcome costs: lost progress, retrieval and recovery phases."""
        return self.lost_s + self.retrieval_s + self.downtime_s


@dataclass(frozen=True)
class Analysis:
    """The analytic model's answer for one strategy."""

    name: str
    failures_per_day: float
    steady_ratio: float
    outcomes: tuple[Outcome, ...]

    @property
    def wasted_per_failure_s(self) -> float:
        """Expected time one failure wastes."""
        return sum(o.probability * o.wasted_s for o in self.outcomes)

    @property
    def fallback_probability(self) -> float:
        """Probability that a failure rolls back to a persistent checkpoint from storage."""
        return sum(o.probability for o in self.outcomes if o.label == "persistent")

    @property
    def effective_ratio(self) -> float:
        """Effective training time ratio, max(0, steady - F * wasted / day)."""
        loss = self.failures_per_day * self.wasted_per_failure_s / DAY_S
        return max(0.0, self.steady_ratio - loss)


def gemini_interval_iterations(scenario: Scenario, replicas: int) -> int:
    """Iterations between Gemini checkpoints: as set, else the fewest that fit the idle network."""
    if scenario.gemini.interval_iterations:
        return scenario.gemini.interval_iterations
    traffic = gemini_checkpoint_s(scenario, replicas)
    t = scenario.training
    budget = t.idle_network_s if t.idle_network_s > 0 else t.iteration_s
    return max(1, math.ceil(traffic / budget - 1e-9))


def gemini_placement(scenario: Scenario, replicas: int) -> tuple[Placement, str]:
    """Gemini's placement for m replicas, domain-aware if the scenario asks; with its reason."""
    return place(
        scenario.cluster.machines,
        replicas,
        scenario.gemini.placement,
        scenario.domains() if scenario.gemini.domain_aware else None,
    )


def gemini_timing(
    scenario: Scenario,
    replicas: int,
    interval_iterations: int,
    placement: Placement | None = None,
) -> StrategyTiming:
    """Gemini's timing for m replicas, checkpointing every `interval_iterations` iterations.

    Traffic that does not fit the idle network time of the interval stalls training.
    `placement` defaults to `gemini_placement(scenario, replicas)`.
    """
    t = scenario.training
    traffic = gemini_checkpoint_s(scenario, replicas)
    idle = (t.idle_network_s or t.iteration_s) * interval_iterations
    interval = interval_iterations * t.iteration_s
    if placement is None:
        placement, _ = gemini_placement(scenario, replicas)
    return StrategyTiming(
        name=GEMINI,
        interval_s=interval,
        blocking_s=t.snapshot_blocking_s + max(0.0, traffic - idle),
        checkpoint_s=interval,  # replicas of step s travel during the next interval
        retrieval_s=peer_retrieval_s(scenario),
        recovery=scenario.gemini.recovery,
        in_memory=True,
        remote_retrieval_s=remote_checkpoint_s(scenario),
        persistent_interval_s=scenario.gemini.persistent_interval_s,
        persistent_checkpoint_s=remote_checkpoint_s(scenario),
        placement=placement,
    )


def strategy_timings(scenario: Scenario) -> tuple[StrategyTiming, ...]:
    """The three strategies of the paper, derived from the scenario: Gemini, Strawman, HighFreq."""
    remote = remote_checkpoint_s(scenario)
    m = scenario.gemini.replicas
    b = scenario.baselines
    iteration = scenario.training.iteration_s
    highfreq_interval = eq2_min_interval_s(remote, iteration)
    if b.align_to_iterations:
        highfreq_interval = math.ceil(remote / iteration - 1e-9) * iteration
    return (
        gemini_timing(scenario, m, gemini_interval_iterations(scenario, m)),
        StrategyTiming(STRAWMAN, b.strawman_interval_s, 0.0, remote, remote, b.recovery),
        StrategyTiming(
            HIGHFREQ, highfreq_interval, b.highfreq_blocking_s, remote, remote, b.recovery
        ),
    )


def recovery_window_s(timing: StrategyTiming) -> float:
    """How long a hardware failure leaves its group short of a copy: until training resumes."""
    r = timing.recovery
    return r.detection_s + r.serialization_s + r.replacement_s + r.restart_s + timing.retrieval_s


def hardware_share(scenario: Scenario) -> float:
    """Fraction of failure incidents that lose CPU memory (domain events always do)."""
    total = scenario.failures_per_day
    if total == 0:
        return scenario.failures.hardware_fraction
    independent = scenario.cluster.machines * scenario.failures.per_machine_per_day
    hardware = independent * scenario.failures.hardware_fraction
    return (hardware + total - independent) / total


def group_loss_probability(scenario: Scenario, timing: StrategyTiming) -> float:
    """First-order chance that a hardware failure ends with some checkpoint gone from memory.

    After machine i is lost, a holder set H containing i is wiped if its other m-1 members also
    fail (hardware) within the recovery window W. With q = 1 - exp(-lambda_hw W) per machine,
    P_i ~= min(1, n_i q^(m-1)), n_i = number of distinct holder sets containing i, averaged over i.
    Independent failures only; correlated domain events are what the simulator adds.
    """
    placement = timing.placement
    if placement is None:
        return 0.0
    f = scenario.failures
    rate = f.per_machine_per_day * f.hardware_fraction / DAY_S
    q = 1.0 - math.exp(-rate * recovery_window_s(timing))
    containing = Counter(i for hs in {frozenset(h) for h in placement.holders} for i in hs)
    per_machine = [
        min(1.0, containing[i] * q ** (placement.replicas - 1)) for i in range(placement.machines)
    ]
    return sum(per_machine) / len(per_machine)


def analyze(scenario: Scenario, timing: StrategyTiming, group_loss: bool = True) -> Analysis:
    """Apply the model to one strategy.

    Args:
        scenario: The failure rates and sizes.
        timing: The strategy, from `strategy_timings` or `gemini_timing`.
        group_loss: Include Gemini's fallback when a whole holder set is lost within a recovery
            window (False reproduces the paper, which assumes it never happens).
    """
    r = timing.recovery
    down = r.detection_s + r.serialization_s + r.restart_s
    hw = hardware_share(scenario)
    outcomes: tuple[Outcome, ...]
    if not timing.in_memory:
        outcomes = (
            Outcome("software", 1 - hw, timing.lost_s, timing.retrieval_s, down),
            Outcome("hardware", hw, timing.lost_s, timing.retrieval_s, down + r.replacement_s),
        )
    else:
        p = group_loss_probability(scenario, timing) if group_loss else 0.0
        fallback_lost = timing.persistent_checkpoint_s + timing.persistent_interval_s / 2
        outcomes = (
            Outcome("local", 1 - hw, timing.lost_s, 0.0, down),
            Outcome(
                "peer", hw * (1 - p), timing.lost_s, timing.retrieval_s, down + r.replacement_s
            ),
            Outcome(
                "persistent",
                hw * p,
                fallback_lost,
                timing.remote_retrieval_s,
                r.detection_s + r.replacement_s + r.restart_s,
            ),
        )
    return Analysis(
        name=timing.name,
        failures_per_day=scenario.failures_per_day,
        steady_ratio=timing.steady_ratio,
        outcomes=tuple(o for o in outcomes if o.probability > 0) or outcomes[:1],
    )


def analyze_all(scenario: Scenario, group_loss: bool = True) -> tuple[Analysis, ...]:
    """`analyze` for Gemini, Strawman and HighFreq."""
    return tuple(analyze(scenario, t, group_loss) for t in strategy_timings(scenario))
