"""Recommender: the checkpoint interval and replica count m that maximise effective training time.

A pure policy: `recommend(scenario, budget)` returns the decision and the reasoning as text. It
scans m = 1..max_replicas and, for each, checkpoint intervals of 1..max iterations with the analytic
model (Gemini's fallback to persistent storage included), keeps the m whose double-buffered replicas
fit the CPU-memory budget, and picks the best ratio (ties: fewer replicas, then the shorter
interval).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gemini_ckpt.errors import SimulationError
from gemini_ckpt.sim.analytic import (
    HIGHFREQ,
    STRAWMAN,
    analyze,
    analyze_all,
    gemini_placement,
    gemini_timing,
    hardware_share,
    remote_checkpoint_s,
)
from gemini_ckpt.sim.params import DAY_S, Scenario

_TIE = 1e-9
REPLICA_GAIN = 1e-4
"""The ratio another replica must add to be worth its memory and traffic (about 9 s per day)."""


@dataclass(frozen=True)
class Candidate:
    """The best interval found for one replica count."""

    replicas: int
    memory_gb: float
    fits: bool
    interval_iterations: int
    effective_ratio: float
    fallback_probability: float


@dataclass(frozen=True)
class Recommendation:
    """The decision. `replicas` is 0 when no m fits the budget: use remote checkpoints instead.

    Attributes:
        replicas: m to use (0: in-memory checkpoints do not fit).
        interval_iterations: Iterations between in-memory checkpoints (0 with replicas = 0).
        interval_s: The checkpoint interval in seconds (Young/Daly's for remote storage when
            replicas = 0).
        effective_ratio: The analytic effective training time ratio of the choice.
        memory_gb: CPU memory per machine the replicas take (two buffers per replica).
        candidates: The best interval of every m considered.
    """

    replicas: int
    interval_iterations: int
    interval_s: float
    effective_ratio: float
    memory_gb: float
    candidates: tuple[Candidate, ...]


def replica_memory_gb(scenario: Scenario, replicas: int) -> float:
    """CPU memory per machine for m replicas: two buffers (complete + in flight) per replica."""
    return 2 * replicas * scenario.checkpoint_bytes_per_machine / 1e9


def candidate_intervals(max_iterations: int) -> list[int]:
    """Every interval up to 32 iterations, then steps of about 25 % up to `max_iterations`."""
    values = set(range(1, min(32, max_iterations) + 1))
    value = 32.0
    while value < max_iterations:
        value *= 1.25
        values.add(min(max_iterations, math.ceil(value)))
    return sorted(values)


def _best_for(
    scenario: Scenario, replicas: int, budget_gb: float, intervals: list[int]
) -> Candidate:
    placement, _ = gemini_placement(scenario, replicas)
    best = None
    for n in intervals:
        analysis = analyze(scenario, gemini_timing(scenario, replicas, n, placement))
        if best is None or analysis.effective_ratio > best[1] + _TIE:
            best = (n, analysis.effective_ratio, analysis.fallback_probability)
    if best is None:
        raise SimulationError("no checkpoint interval to consider")
    memory = replica_memory_gb(scenario, replicas)
    return Candidate(replicas, memory, memory <= budget_gb, best[0], best[1], best[2])


def recommend(
    scenario: Scenario,
    memory_budget_gb: float | None = None,
    max_replicas: int = 4,
    max_interval_iterations: int = 1000,
) -> tuple[Recommendation, str]:
    """Choose m and the checkpoint interval; explain the choice.

    Args:
        scenario: Cluster, model, failures and recovery times.
        memory_budget_gb: CPU memory per machine available for replicas; default the machine's.
        max_replicas: Largest m to consider (capped at N).
        max_interval_iterations: Longest checkpoint interval to consider, in iterations.

    Returns:
        The recommendation and its reasoning, one statement per line.

    Raises:
        SimulationError: a non-positive budget or limit.
    """
    budget = scenario.cluster.cpu_memory_gb if memory_budget_gb is None else memory_budget_gb
    if not budget > 0 or max_replicas < 1 or max_interval_iterations < 1:
        raise SimulationError(
            "memory budget, max replicas and max interval must be positive, got "
            f"{budget}, {max_replicas}, {max_interval_iterations}"
        )
    intervals = candidate_intervals(max_interval_iterations)
    top = min(max_replicas, scenario.cluster.machines)
    candidates = tuple(_best_for(scenario, m, budget, intervals) for m in range(1, top + 1))
    lines = _context(scenario, budget)
    lines += [_describe(c, budget) for c in candidates]
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        decision = _remote_only(scenario, candidates)
        lines.append(
            f"Chosen: no in-memory replicas fit {budget:g} GB; checkpoint to remote storage every "
            f"{decision.interval_s / 60:.1f} min (Young/Daly: sqrt(2 t_ckpt MTBF))."
        )
        return decision, "\n".join(lines)
    chosen = fitting[0]
    for c in fitting[1:]:
        if c.effective_ratio > chosen.effective_ratio + REPLICA_GAIN:
            chosen = c
    lines += _why(scenario, chosen, fitting)
    decision = Recommendation(
        replicas=chosen.replicas,
        interval_iterations=chosen.interval_iterations,
        interval_s=chosen.interval_iterations * scenario.training.iteration_s,
        effective_ratio=chosen.effective_ratio,
        memory_gb=chosen.memory_gb,
        candidates=candidates,
    )
    return decision, "\n".join(lines)


def _context(scenario: Scenario, budget: float) -> list[str]:
    per_machine = scenario.checkpoint_bytes_per_machine / 1e9
    return [
        f"Cluster: N={scenario.cluster.machines} machines, {per_machine:.1f} GB of checkpoint per "
        f"machine, {scenario.failures_per_day:.3g} failures/day "
        f"({hardware_share(scenario):.0%} lose the machine's memory); "
        f"budget {budget:g} GB of CPU memory per machine.",
    ]


def _describe(c: Candidate, budget: float) -> str:
    if not c.fits:
        return f"m={c.replicas}: needs {c.memory_gb:.0f} GB > {budget:g} GB budget: excluded."
    return (
        f"m={c.replicas}: {c.memory_gb:.0f} GB; best every {c.interval_iterations} iteration(s): "
        f"ratio {c.effective_ratio:.5f}, fallback to storage in {c.fallback_probability:.2%} "
        "of failures."
    )


def _why(scenario: Scenario, chosen: Candidate, fitting: list[Candidate]) -> list[str]:
    baselines = {a.name: a.effective_ratio for a in analyze_all(scenario)}
    lines = [
        f"Chosen: m={chosen.replicas}, checkpoint every {chosen.interval_iterations} iteration(s) "
        f"({chosen.interval_iterations * scenario.training.iteration_s:g} s): ratio "
        f"{chosen.effective_ratio:.5f} (HighFreq {baselines[HIGHFREQ]:.5f}, Strawman "
        f"{baselines[STRAWMAN]:.5f})."
    ]
    fewer = [c for c in fitting if c.replicas < chosen.replicas]
    if fewer:
        alt = max(fewer, key=lambda c: c.effective_ratio)
        lines.append(
            f"Why not m={alt.replicas}: its ratio is lower by "
            f"{chosen.effective_ratio - alt.effective_ratio:.5f}; it falls back to storage in "
            f"{alt.fallback_probability:.2%} of failures."
        )
    more = [c for c in fitting if c.replicas > chosen.replicas]
    if more:
        gain = max(c.effective_ratio for c in more) - chosen.effective_ratio
        lines.append(
            f"Why m={chosen.replicas}: more replicas gain at most {max(gain, 0.0):.2e} of the "
            f"ratio (less than {REPLICA_GAIN:g}), not worth their memory and traffic."
        )
    if hardware_share(scenario) == 0:
        lines.append(
            "Note: no failure in this scenario loses a machine's memory, so peer copies never "
            "matter; set a hardware failure fraction to weigh them."
        )
    if chosen.interval_iterations > 1:
        lines.append(
            f"Why every {chosen.interval_iterations} iterations: shorter intervals block training "
            "(checkpoint traffic beyond the idle network time, or snapshot blocking) more than "
            "they save in lost progress."
        )
    return lines


def _remote_only(scenario: Scenario, candidates: tuple[Candidate, ...]) -> Recommendation:
    t_ckpt = remote_checkpoint_s(scenario)
    rate = scenario.failures_per_day
    mtbf = DAY_S / rate if rate > 0 else math.inf
    interval = max(t_ckpt, math.sqrt(2 * t_ckpt * mtbf)) if math.isfinite(mtbf) else math.inf
    return Recommendation(0, 0, interval, 0.0, 0.0, candidates)
