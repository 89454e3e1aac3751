"""Failure simulator and planner: wasted time and effective training time for Gemini and baselines.

- `params`: the scenario, every parameter explicit (frozen, validated dataclasses).
- `analytic`: the paper's Eq. 1-2 model for Gemini, Strawman and HighFreq.
- `montecarlo`: a seeded simulation with Poisson and correlated failures, repairs and fallbacks.
- `recommend`: the checkpoint interval and replica count that maximise effective training time.
- `paper`: the paper's settings and the data of its analytic figures.
- `measured`, `scenario_file`: inputs from benchmark JSON and TOML files; `plots`, `report`: output.
"""

from gemini_ckpt.sim.analytic import (
    Analysis,
    StrategyTiming,
    analyze,
    analyze_all,
    strategy_timings,
)
from gemini_ckpt.sim.montecarlo import MonteCarloConfig, MonteCarloResult, simulate
from gemini_ckpt.sim.params import (
    BaselineSpec,
    ClusterSpec,
    FailureSpec,
    GeminiSpec,
    ModelSpec,
    RecoveryTimes,
    Scenario,
    TrainingSpec,
)
from gemini_ckpt.sim.recommend import Recommendation, recommend

__all__ = [
    "Analysis",
    "BaselineSpec",
    "ClusterSpec",
    "FailureSpec",
    "GeminiSpec",
    "ModelSpec",
    "MonteCarloConfig",
    "MonteCarloResult",
    "Recommendation",
    "RecoveryTimes",
    "Scenario",
    "StrategyTiming",
    "TrainingSpec",
    "analyze",
    "analyze_all",
    "recommend",
    "simulate",
    "strategy_timings",
]
