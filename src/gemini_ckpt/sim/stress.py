"""Where the paper's model stops holding: correlated failures and k >= m failures in one group.

Two sweeps compare the analytic model with the Monte Carlo simulator on Gemini (m = 2, 16 machines,
GPT-2 100B):

- `correlated_failures`: racks of 4 machines fail as a whole. The model counts a rack event as one
  ordinary failure; the simulator shows that group placement laid over consecutive machines puts
  both copies of a checkpoint in one rack, so each rack event falls back to the persistent
  checkpoint, while domain-aware placement keeps the model's prediction.
- `long_repairs`: every failure loses the machine, and replacements take longer and longer. The
  paper's model (no group loss) keeps its prediction; the simulator sees a group's second member
  fail before the first is replaced (k >= m in one group) and fall back to the persistent
  checkpoint; our first-order group-loss term follows it while recoveries rarely overlap. With hour-
  long replacements failures pile up during recovery, which neither model counts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from gemini_ckpt.sim.analytic import analyze, gemini_timing, strategy_timings
from gemini_ckpt.sim.montecarlo import MonteCarloConfig, MonteCarloResult, simulate
from gemini_ckpt.sim.params import HOUR_S, ClusterSpec, FailureSpec, Scenario

CORRELATED_RATES = (0.0, 0.05, 0.1, 0.2, 0.4)
REPLACEMENT_S = (0.0, 600.0, 1800.0, 3600.0)


def _gemini_mc(scenario: Scenario, config: MonteCarloConfig) -> MonteCarloResult:
    gemini = strategy_timings(scenario)[0]
    return simulate(scenario, config, (gemini,))[0]


def _mc_columns(prefix: str, result: MonteCarloResult) -> dict[str, Any]:
    return {
        f"{prefix}": result.ratio_mean,
        f"{prefix}_low": result.ratio_low,
        f"{prefix}_high": result.ratio_high,
        f"{prefix}_fallbacks": result.fallbacks,
    }


def correlated_scenario(domain_failures_per_day: float, domain_aware: bool = False) -> Scenario:
    """16 machines in racks of 4; independent failures (half lose the machine) plus rack events."""
    base = Scenario()
    return replace(
        base,
        failures=FailureSpec(
            per_machine_per_day=0.015,
            hardware_fraction=0.5,
            domain_size=4,
            domain_failures_per_day=domain_failures_per_day,
        ),
        gemini=replace(base.gemini, domain_aware=domain_aware),
    )


def correlated_failures(
    rates: Iterable[float] = CORRELATED_RATES, config: MonteCarloConfig | None = None
) -> list[dict[str, Any]]:
    """Gemini under rack failures: model vs simulation, plain and domain-aware placement."""
    cfg = config or MonteCarloConfig()
    rows = []
    for rate in rates:
        plain = correlated_scenario(rate)
        row: dict[str, Any] = {"rack_failures_per_day": rate}
        row["model"] = analyze(plain, strategy_timings(plain)[0]).effective_ratio
        row.update(_mc_columns("mc_grouped", _gemini_mc(plain, cfg)))
        row.update(_mc_columns("mc_domain_aware", _gemini_mc(correlated_scenario(rate, True), cfg)))
        rows.append(row)
    return rows


def long_repair_scenario(replacement_s: float) -> Scenario:
    """8 machines, one failure per machine per day, each losing the machine; 12-hourly persists."""
    base = Scenario(cluster=ClusterSpec(machines=8))
    return replace(
        base,
        failures=FailureSpec(per_machine_per_day=1.0, hardware_fraction=1.0),
        gemini=replace(
            base.gemini,
            persistent_interval_s=12 * HOUR_S,
            recovery=replace(base.gemini.recovery, replacement_s=replacement_s),
        ),
    )


def long_repairs(
    replacement_s: Iterable[float] = REPLACEMENT_S, config: MonteCarloConfig | None = None
) -> list[dict[str, Any]]:
    """Gemini as replacements slow down: the paper's model, ours with group loss, simulation."""
    cfg = config or MonteCarloConfig()
    rows = []
    for seconds in replacement_s:
        scenario = long_repair_scenario(seconds)
        timing = gemini_timing(scenario, 2, 1)
        row: dict[str, Any] = {"replacement_min": seconds / 60}
        row["model_paper"] = analyze(scenario, timing, group_loss=False).effective_ratio
        row["model_group_loss"] = analyze(scenario, timing).effective_ratio
        row.update(_mc_columns("mc", _gemini_mc(scenario, cfg)))
        rows.append(row)
    return rows
