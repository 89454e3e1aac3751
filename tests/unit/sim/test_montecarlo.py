"""The Monte Carlo simulator: reproducible, fully accounted, agreeing with the model where the
model's assumptions hold and departing from it where they do not."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from gemini_ckpt.errors import SimulationError
from gemini_ckpt.sim import paper, stress
from gemini_ckpt.sim.analytic import analyze, analyze_all, gemini_timing, strategy_timings
from gemini_ckpt.sim.failures import FailureEvent, failure_events
from gemini_ckpt.sim.montecarlo import (
    WASTE,
    MonteCarloConfig,
    recovery_source,
    simulate,
    simulate_run,
)
from gemini_ckpt.sim.params import DAY_S, FailureSpec, GeminiSpec, RecoveryTimes, Scenario

SMALL = MonteCarloConfig(days=30, runs=20, seed=7)


def test_same_seed_same_result_and_different_seed_differs() -> None:
    s = paper.paper_scenario(16, 4)
    assert simulate(s, SMALL) == simulate(s, SMALL)
    assert simulate(s, SMALL) != simulate(s, replace(SMALL, seed=8))


def test_every_second_is_accounted_for() -> None:
    s = replace(
        paper.paper_scenario(16, 6),
        failures=FailureSpec(per_machine_per_day=0.4, hardware_fraction=0.5),
    )
    horizon = 5 * DAY_S
    events = failure_events(s, horizon, random.Random(3))
    for result in simulate_run(strategy_timings(s), events, horizon):
        assert result.progress_s + sum(result.waste.values()) == pytest.approx(horizon)
        assert result.failures == len(events)
        assert all(value >= 0 for value in result.waste.values())


def test_without_failures_the_ratio_is_the_steady_ratio() -> None:
    s = replace(paper.paper_scenario(), failures=FailureSpec(per_machine_per_day=0))
    gemini, strawman, highfreq = simulate(s, MonteCarloConfig(days=1, runs=2))
    assert gemini.ratio_mean == strawman.ratio_mean == 1.0
    assert highfreq.ratio_mean == pytest.approx(480 / 560)
    assert gemini.failures_per_day == 0


def test_monte_carlo_agrees_with_the_model_where_its_assumptions_hold() -> None:
    """Independent software failures, checkpoint intervals far below the time between failures."""
    s = paper.paper_scenario(16, 2)
    timings = strategy_timings(s)
    gemini, _, highfreq = simulate(s, SMALL)
    model = analyze_all(s)
    assert gemini.contains(model[0].effective_ratio)
    assert gemini.wasted_per_failure_s == pytest.approx(model[0].wasted_per_failure_s, rel=0.02)
    assert gemini.sources == {"local": sum(gemini.sources.values())}
    # HighFreq: the notebook charges downtime at full rate, the simulator at the steady rate
    # (nothing would have trained during serialisation anyway); the gap is exactly that.
    downtime = model[2].wasted_per_failure_s - timings[2].lost_s
    gap = (1 - timings[2].steady_ratio) * model[2].failures_per_day * downtime / DAY_S
    assert highfreq.contains(model[2].effective_ratio + gap)


def test_correlated_failures_break_the_model_unless_placement_spreads_racks() -> None:
    cfg = MonteCarloConfig(days=30, runs=20, seed=1)
    (row,) = stress.correlated_failures(rates=(0.2,), config=cfg)
    assert row["mc_grouped_high"] < row["model"] - 0.03  # each rack event loses whole groups
    assert row["mc_grouped_fallbacks"] > 100
    assert row["mc_domain_aware_low"] <= row["model"] <= row["mc_domain_aware_high"]
    assert row["mc_domain_aware_fallbacks"] <= 2  # only two independent failures can do it


def test_k_failures_in_one_group_break_the_papers_model() -> None:
    cfg = MonteCarloConfig(days=30, runs=20, seed=2)
    (row,) = stress.long_repairs(replacement_s=(600.0,), config=cfg)
    assert row["mc_fallbacks"] > 20
    assert row["mc_high"] < row["model_paper"]  # the paper's model assumes this never happens
    assert row["mc_low"] <= row["model_group_loss"] <= row["mc_high"]  # our first-order term


def _one_run(scenario: Scenario, events: list[FailureEvent], horizon: float = DAY_S) -> dict:
    timing = strategy_timings(scenario)[0]
    (result,) = simulate_run((timing,), events, horizon)
    return {"sources": result.sources, "waste": result.waste, "progress": result.progress_s}


def test_fallback_only_when_a_whole_holder_set_is_lost() -> None:
    s = replace(
        paper.paper_scenario(),
        gemini=GeminiSpec(recovery=RecoveryTimes(replacement_s=600)),
    )
    # machines 0 and 1 form a group; 0 and 2 do not
    same = [FailureEvent(40_000, (0,), True), FailureEvent(40_100, (1,), True)]
    other = [FailureEvent(40_000, (0,), True), FailureEvent(40_100, (2,), True)]
    later = [FailureEvent(40_000, (0,), True), FailureEvent(45_000, (1,), True)]
    software = [FailureEvent(40_000, (0,), False), FailureEvent(40_100, (1,), False)]
    assert _one_run(s, same)["sources"] == {"peer": 1, "persistent": 1}
    assert _one_run(s, other)["sources"] == {"peer": 2}
    assert _one_run(s, later)["sources"] == {"peer": 2}  # the group was whole again
    assert _one_run(s, software)["sources"] == {"local": 2}
    lost = _one_run(s, same)["waste"]["lost"]
    assert lost == pytest.approx(40_000 - 3 * 3 * 3600)  # back to the persistent one of 9 h


def test_recovery_source_policy_explains_itself() -> None:
    s = replace(paper.paper_scenario(), gemini=GeminiSpec(replicas=2))
    gemini, strawman, _ = strategy_timings(s)
    assert recovery_source(gemini, []) == (
        "local",
        "no machine lost its memory: every machine restores its own copy",
    )
    assert recovery_source(gemini, [0, 2])[0] == "peer"
    source, reason = recovery_source(gemini, [3, 2])
    assert source == "persistent"
    assert reason.startswith("machine 2's holders [2, 3] are all among the lost [2, 3]")
    assert recovery_source(strawman, [0, 1])[0] == "storage"


def test_a_domain_event_wipes_a_group_in_one_rack() -> None:
    racks = replace(paper.paper_scenario(), failures=FailureSpec(domain_size=4))
    event = [FailureEvent(20_000, (0, 1, 2, 3), True, 0)]
    assert _one_run(racks, event)["sources"] == {"persistent": 1}
    aware = replace(racks, gemini=GeminiSpec(domain_aware=True))
    assert _one_run(aware, event)["sources"] == {"peer": 1}


def test_one_replica_falls_back_on_every_hardware_failure() -> None:
    s = replace(
        paper.paper_scenario(),
        failures=FailureSpec(per_machine_per_day=0.1, hardware_fraction=1.0),
        gemini=GeminiSpec(replicas=1),
    )
    (gemini,) = simulate(s, MonteCarloConfig(days=10, runs=2), (strategy_timings(s)[0],))
    assert gemini.fallbacks == sum(gemini.sources.values()) > 0


def test_any_placement_and_replica_count() -> None:
    s = replace(
        paper.paper_scenario(17, 4),
        failures=FailureSpec(per_machine_per_day=0.3, hardware_fraction=1.0),
    )
    for placement in ("mixed", "ring"):
        for m in (2, 3):
            g = replace(s, gemini=GeminiSpec(replicas=m, placement=placement))
            timing = gemini_timing(g, m, 1)
            (result,) = simulate(g, MonteCarloConfig(days=5, runs=2), (timing,))
            assert 0.8 < result.ratio_mean <= analyze(g, timing, group_loss=False).steady_ratio
            assert set(result.waste_per_day_s) == set(WASTE)


def test_invalid_config() -> None:
    with pytest.raises(SimulationError, match="runs must be >= 2"):
        MonteCarloConfig(runs=1)
    with pytest.raises(SimulationError, match="confidence"):
        MonteCarloConfig(confidence=1.0)
