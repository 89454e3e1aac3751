"""The paper's evaluation settings and the data behind its analytic figures (9-12, 15).

Each `figure*` function returns plain rows (lists of dicts of numbers) that the CLI prints as a
table or JSON and `plots` draws. Rows come from the same model the rest of the package uses; where
the paper's notebook used a different formula, both are given (e.g. the ring union bound in Figure
9).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from gemini_ckpt.placement import mixed_placement, recovery_probability, ring_placement
from gemini_ckpt.placement.analysis import ring_union_bound
from gemini_ckpt.sim.analytic import (
    analyze_all,
    checkpoint_time_reduction,
    eq1_wasted_s,
    remote_checkpoint_s,
    strategy_timings,
)
from gemini_ckpt.sim.montecarlo import MonteCarloConfig, simulate
from gemini_ckpt.sim.params import ClusterSpec, FailureSpec, ModelSpec, Scenario

Row = dict[str, Any]
"""One row of a figure's data: column name to number (or the strategy's name)."""

FIG15A_FAILURES_PER_DAY = (1, 2, 3, 4, 5, 6, 7, 8)
FIG15B_MACHINES = (200, 400, 600, 800, 1000)
PAPER_RATE_PER_MACHINE_PER_DAY = 0.015


def paper_scenario(machines: int = 16, failures_per_day: float | None = None) -> Scenario:
    """GPT-2 100B on p4d.24xlarge machines with the paper's constants.

    Args:
        machines: N.
        failures_per_day: Failures per day in the whole cluster; default 1.5 % of machines per day.
    """
    per_machine = (
        PAPER_RATE_PER_MACHINE_PER_DAY if failures_per_day is None else failures_per_day / machines
    )
    return Scenario(
        cluster=ClusterSpec(machines=machines),
        failures=FailureSpec(per_machine_per_day=per_machine),
    )


def mt_nlg_scenario() -> Scenario:
    """The paper's motivating example: MT-NLG 530B, 12 bytes per parameter, 20 Gbps storage."""
    return Scenario(model=ModelSpec(parameters=530e9), cluster=ClusterSpec(machines=560))


def mt_nlg_wasted() -> Row:
    """MT-NLG with back-to-back remote checkpoints: Eq. 1 with 1/f = t_ckpt = t_rtvl."""
    t_ckpt = remote_checkpoint_s(mt_nlg_scenario())
    return {
        "checkpoint_min": t_ckpt / 60,
        "wasted_min": eq1_wasted_s(t_ckpt, t_ckpt, t_ckpt) / 60,
        "wasted_rounded_min": eq1_wasted_s(42 * 60, 42 * 60, 42 * 60) / 60,
    }


def figure9(machines: Iterable[int] = range(16, 129), replicas: int = 2) -> list[Row]:
    """Recovery probability of mixed/group and ring placement at k = m and k = m + 1.

    Exact values for every N (mixed placement for odd N) next to the notebook's ring formula.
    """
    rows = []
    for n in machines:
        grouped, ring = mixed_placement(n, replicas), ring_placement(n, replicas)
        row: Row = {"machines": n}
        for k in (replicas, replicas + 1):
            row[f"group_k{k}"] = float(recovery_probability(grouped, k))
            row[f"ring_k{k}"] = float(recovery_probability(ring, k))
            row[f"ring_formula_k{k}"] = float(ring_union_bound(n, replicas, k))
        rows.append(row)
    return rows


def figure10(scenario: Scenario | None = None) -> list[Row]:
    """Eq. 1's average wasted time per strategy, recovery overheads excluded (minutes)."""
    rows = []
    for t in strategy_timings(scenario or paper_scenario()):
        rows.append(
            {
                "strategy": t.name,
                "memory_min": eq1_wasted_s(t.checkpoint_s, t.interval_s, 0.0) / 60,
                "retrieval_min": t.retrieval_s / 60,
                "wasted_min": eq1_wasted_s(t.checkpoint_s, t.interval_s, t.retrieval_s) / 60,
            }
        )
    return rows


def figure11(
    machines: Iterable[int] = (4, 8, 12, 16), bandwidths: Iterable[float] = (100, 200, 400)
) -> list[Row]:
    """Remote-storage checkpoint time over Gemini's, m = 2, 20 Gbps storage."""
    rows = []
    for n in machines:
        row: Row = {"machines": n}
        for gbps in bandwidths:
            scenario = Scenario(cluster=ClusterSpec(machines=n, network_gbps=gbps))
            row[f"{gbps:g}gbps"] = checkpoint_time_reduction(scenario)
        rows.append(row)
    return rows


def figure12(scenario: Scenario | None = None) -> list[Row]:
    """Checkpoints per hour of training; HighFreq every ceil(t_ckpt / T_iter) iterations."""
    base = scenario or paper_scenario()
    aligned = replace(base, baselines=replace(base.baselines, align_to_iterations=True))
    return [
        {"strategy": t.name, "per_hour": t.checkpoints_per_hour} for t in strategy_timings(aligned)
    ]


def figure15a(
    failures_per_day: Iterable[float] = FIG15A_FAILURES_PER_DAY,
    monte_carlo: MonteCarloConfig | None = None,
) -> list[Row]:
    """Effective training time ratio on 16 machines against failures per day."""
    return [
        _ratios(paper_scenario(16, f), {"failures_per_day": f}, monte_carlo)
        for f in failures_per_day
    ]


def figure15b(
    machines: Iterable[int] = FIG15B_MACHINES, monte_carlo: MonteCarloConfig | None = None
) -> list[Row]:
    """Effective training time ratio against cluster size at 1.5 % failures per machine per day."""
    return [_ratios(paper_scenario(n), {"machines": n}, monte_carlo) for n in machines]


def _ratios(scenario: Scenario, row: Row, monte_carlo: MonteCarloConfig | None) -> Row:
    for analysis in analyze_all(scenario, group_loss=False):
        row[analysis.name] = analysis.effective_ratio
    if monte_carlo is not None:
        for result in simulate(scenario, monte_carlo):
            row[f"{result.name}_mc"] = result.ratio_mean
            row[f"{result.name}_mc_low"] = result.ratio_low
            row[f"{result.name}_mc_high"] = result.ratio_high
    return row
