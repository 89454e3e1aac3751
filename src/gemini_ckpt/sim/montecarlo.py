"""Seeded Monte Carlo simulation of training runs with failures.

Each run draws one failure timeline (`failures.failure_events`) and replays it against every
strategy (common random numbers, so differences between strategies are not sampling noise). Between
failures training progresses at the strategy's steady rate; checkpoints are captured every interval
of progress and become usable `checkpoint_s` after the capture (after any blocking). At a failure:

- progress rolls back to the newest usable checkpoint: for Gemini the newest in-memory one if every
  machine still has a surviving holder among the machines not lost since training last resumed,
  else the newest persistent one (the fallback); for the baselines the newest one in storage;
- recovery runs its phases in order (detection, serialisation, replacement after hardware failures,
  retrieval, restart); a failure during recovery starts recovery over, and machines lost during it
  stay lost until training resumes (that is how k >= m failures hit one group).

The effective training time ratio of a run is the progress at the horizon over the horizon. Every
second of the horizon is accounted for: progress + lost + blocking + recovery phases = horizon.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from gemini_ckpt.errors import SimulationError
from gemini_ckpt.sim.analytic import StrategyTiming, strategy_timings
from gemini_ckpt.sim.failures import FailureEvent, failure_events
from gemini_ckpt.sim.params import DAY_S, Scenario

PHASES = ("detection", "serialization", "replacement", "retrieval", "restart")
"""Recovery phases, in the order they run."""
WASTE = ("lost", "blocking", *PHASES)
"""Where wasted time goes: rolled-back progress, checkpoint blocking, then the recovery phases."""
_EPS = 1e-9


@dataclass(frozen=True)
class MonteCarloConfig:
    """How much to simulate.

    Attributes:
        days: Length of each simulated run, in days of wall-clock time.
        runs: Independent runs (>= 2, for a confidence interval).
        seed: Seed of the first run; run i uses a generator seeded from (seed, i).
        confidence: Two-sided confidence level of the interval on the mean ratio.
    """

    days: float = 30.0
    runs: int = 20
    seed: int = 0
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if not (math.isfinite(self.days) and self.days > 0):
            raise SimulationError(f"days must be positive, got {self.days}")
        if self.runs < 2:
            raise SimulationError(f"runs must be >= 2 for a confidence interval, got {self.runs}")
        if not 0 < self.confidence < 1:
            raise SimulationError(f"confidence must be within (0, 1), got {self.confidence}")


@dataclass(frozen=True)
class RunResult:
    """One strategy over one simulated run."""

    horizon_s: float
    progress_s: float
    failures: int
    waste: dict[str, float]
    sources: dict[str, int]

    @property
    def ratio(self) -> float:
        """Effective training time ratio of this run."""
        return self.progress_s / self.horizon_s


@dataclass(frozen=True)
class MonteCarloResult:
    """One strategy over all runs.

    Attributes:
        name: The strategy.
        runs: Number of runs.
        days: Days per run.
        ratio_mean: Mean effective training time ratio.
        ratio_low: Lower end of the confidence interval of the mean.
        ratio_high: Upper end.
        failures_per_day: Failure incidents per day, averaged.
        waste_per_day_s: Mean seconds per day lost to each item of `WASTE`.
        sources: How recoveries were served, summed over runs (`local`, `peer`, `persistent`,
            `storage`).
        wasted_per_failure_s: Failure-caused waste (blocking excluded) over all failures.
    """

    name: str
    runs: int
    days: float
    ratio_mean: float
    ratio_low: float
    ratio_high: float
    failures_per_day: float
    waste_per_day_s: dict[str, float] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)
    wasted_per_failure_s: float = 0.0

    @property
    def fallbacks(self) -> int:
        """Recoveries that had to roll back to a persistent checkpoint (Gemini only)."""
        return self.sources.get("persistent", 0)

    def contains(self, value: float) -> bool:
        """Whether `value` lies within the confidence interval."""
        return self.ratio_low <= value <= self.ratio_high


class _Run:
    """Replays one failure timeline against one strategy."""

    def __init__(self, timing: StrategyTiming, horizon_s: float) -> None:
        self.timing = timing
        self.horizon_s = horizon_s
        self.resume_at = 0.0
        self.progress = 0.0  # at resume_at: the state training restarts from
        self.persisted = 0.0  # newest complete persistent checkpoint (Gemini)
        self.unrepaired: set[int] = set()
        self.plan: tuple[tuple[str, float], ...] = ()
        self.recovery_start = 0.0
        self.failures = 0
        self.waste = dict.fromkeys(WASTE, 0.0)
        self.sources: Counter[str] = Counter()

    def on_failure(self, event: FailureEvent) -> None:
        self.failures += 1
        t = event.time_s
        if t >= self.resume_at:
            self._charge_recovery(self.resume_at)
            now, restore_point = self._close_span(t)
        else:
            self._charge_recovery(t)
            now = restore_point = self.progress
        if event.hardware:
            self.unrepaired.update(event.machines)
        source, restored = self._choose_source(restore_point)
        restored = min(restored, now)
        self.waste["lost"] += now - restored
        self.sources[source] += 1
        self.progress = restored
        self.plan = self._plan(source)
        self.recovery_start = t
        self.resume_at = t + sum(d for _, d in self.plan)

    def finish(self) -> RunResult:
        end = self.horizon_s
        if end >= self.resume_at:
            self._charge_recovery(self.resume_at)
            progress, _ = self._close_span(end)
        else:
            self._charge_recovery(end)
            progress = self.progress
        return RunResult(end, progress, self.failures, dict(self.waste), dict(self.sources))

    def _charge_recovery(self, until: float) -> None:
        """Account the phases of the pending recovery that ran before `until`."""
        spent = until - self.recovery_start
        for phase, duration in self.plan:
            used = min(duration, max(0.0, spent))
            self.waste[phase] += used
            spent -= duration
        self.plan = ()
        if until >= self.resume_at:
            self.unrepaired.clear()  # training resumed: every machine holds its copies again

    def _close_span(self, t: float) -> tuple[float, float]:
        """Progress at `t` and the newest checkpoint usable at `t`, for the span since resuming."""
        timing = self.timing
        span = t - self.resume_at
        steady = timing.steady_ratio
        now = self.progress + steady * span
        self.waste["blocking"] += (1 - steady) * span
        usable_after = timing.blocking_s + timing.checkpoint_s
        newest = _grid_floor(self.progress + steady * (span - usable_after), timing.interval_s)
        if timing.in_memory:
            reach = self.progress + steady * (span - timing.persistent_checkpoint_s)
            persisted = _grid_floor(reach, timing.persistent_interval_s)
            if persisted > self.progress:
                self.persisted = max(self.persisted, persisted)
        return now, max(newest, self.progress)

    def _choose_source(self, restore_point: float) -> tuple[str, float]:
        source, _ = recovery_source(self.timing, self.unrepaired)
        return source, self.persisted if source == "persistent" else restore_point

    def _plan(self, source: str) -> tuple[tuple[str, float], ...]:
        r = self.timing.recovery
        retrieval = {
            "local": 0.0,
            "peer": self.timing.retrieval_s,
            "persistent": self.timing.remote_retrieval_s,
            "storage": self.timing.retrieval_s,
        }[source]
        serialization = 0.0 if source == "persistent" else r.serialization_s
        replacement = r.replacement_s if self.unrepaired else 0.0
        durations = (r.detection_s, serialization, replacement, retrieval, r.restart_s)
        return tuple(zip(PHASES, durations, strict=True))


def recovery_source(timing: StrategyTiming, lost: Iterable[int]) -> tuple[str, str]:
    """Where recovery restores from, and why: the policy the simulator applies at each failure.

    Args:
        timing: The strategy (Gemini's carries its placement).
        lost: Machines whose memory is gone since training last resumed.

    Returns:
        (`local` | `peer` | `persistent` | `storage`, reason).
    """
    down = sorted(set(lost))
    if not timing.in_memory:
        return "storage", f"{timing.name} keeps its checkpoints in remote storage only"
    if not down:
        return "local", "no machine lost its memory: every machine restores its own copy"
    gone = timing.placement.lost_checkpoints(down) if timing.placement else ()
    if gone:
        holders = timing.placement.holders_of(gone[0]) if timing.placement else ()
        return "persistent", (
            f"machine {gone[0]}'s holders {list(holders)} are all among the lost {down}: "
            "roll back to the persistent checkpoint"
        )
    return "peer", f"lost machines {down} fetch their checkpoints from surviving group peers"


def _grid_floor(value: float, step: float) -> float:
    """The largest multiple of `step` not above `value` (with a small tolerance), or -inf."""
    if value < 0:
        return -math.inf
    return math.floor(value / step + _EPS) * step


def simulate_run(
    timings: tuple[StrategyTiming, ...], events: list[FailureEvent], horizon_s: float
) -> tuple[RunResult, ...]:
    """Replay one failure timeline against each strategy."""
    results = []
    for timing in timings:
        run = _Run(timing, horizon_s)
        for event in events:
            run.on_failure(event)
        results.append(run.finish())
    return tuple(results)


def simulate(
    scenario: Scenario,
    config: MonteCarloConfig | None = None,
    timings: tuple[StrategyTiming, ...] | None = None,
) -> tuple[MonteCarloResult, ...]:
    """Simulate `config.runs` runs of every strategy and summarise them.

    Args:
        scenario: Failure rates, domains and sizes.
        config: Run length, count, seed and confidence level (defaults: 20 runs of 30 days).
        timings: Strategies to simulate; default Gemini, Strawman and HighFreq from the scenario.

    Returns:
        One result per strategy, in the order of `timings`.
    """
    cfg = config or MonteCarloConfig()
    strategies = timings if timings is not None else strategy_timings(scenario)
    horizon = cfg.days * DAY_S
    per_strategy: list[list[RunResult]] = [[] for _ in strategies]
    for run in range(cfg.runs):
        rng = random.Random(cfg.seed * 1_000_003 + run)
        events = failure_events(scenario, horizon, rng)
        for bucket, result in zip(
            per_strategy, simulate_run(strategies, events, horizon), strict=True
        ):
            bucket.append(result)
    return tuple(
        _summarise(t.name, results, cfg)
        for t, results in zip(strategies, per_strategy, strict=True)
    )


def _summarise(name: str, results: list[RunResult], cfg: MonteCarloConfig) -> MonteCarloResult:
    ratios = [r.ratio for r in results]
    mean = statistics.fmean(ratios)
    half = _t_quantile(cfg.confidence, len(ratios) - 1) * statistics.stdev(ratios)
    half /= math.sqrt(len(ratios))
    total_days = cfg.days * len(results)
    waste = {key: sum(r.waste[key] for r in results) / total_days for key in WASTE}
    failures = sum(r.failures for r in results)
    sources: Counter[str] = Counter()
    for r in results:
        sources.update(r.sources)
    failure_waste = sum(v for k, v in waste.items() if k != "blocking") * total_days
    return MonteCarloResult(
        name=name,
        runs=len(results),
        days=cfg.days,
        ratio_mean=mean,
        ratio_low=mean - half,
        ratio_high=mean + half,
        failures_per_day=failures / total_days,
        waste_per_day_s=waste,
        sources=dict(sources),
        wasted_per_failure_s=failure_waste / failures if failures else 0.0,
    )


def _t_quantile(confidence: float, dof: int) -> float:
    """Student-t quantile for a two-sided interval (Cornish-Fisher expansion around the normal)."""
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    n = float(dof)
    return (
        z
        + (z**3 + z) / (4 * n)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * n**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * n**3)
    )
