"""The recommender: decisions under memory budgets, with reasons that say why."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gemini_ckpt.errors import SimulationError
from gemini_ckpt.sim import paper
from gemini_ckpt.sim.params import FailureSpec, GeminiSpec, RecoveryTimes, TrainingSpec
from gemini_ckpt.sim.recommend import candidate_intervals, recommend, replica_memory_gb

HARDWARE = replace(
    paper.paper_scenario(),
    failures=FailureSpec(per_machine_per_day=0.05, hardware_fraction=0.5),
    gemini=GeminiSpec(recovery=RecoveryTimes(replacement_s=3600)),
)


def test_peers_pay_off_when_failures_lose_machines() -> None:
    decision, reason = recommend(HARDWARE, memory_budget_gb=400)
    assert (decision.replicas, decision.interval_iterations) == (2, 1)
    assert decision.memory_gb == pytest.approx(300)  # 2 buffers x 2 copies x 75 GB
    assert "m=3: needs 450 GB > 400 GB budget: excluded." in reason
    assert "Why not m=1" in reason
    assert "falls back to storage in 50.00% of failures" in reason


def test_more_replicas_must_earn_their_memory() -> None:
    decision, reason = recommend(HARDWARE)
    assert decision.replicas == 2  # m=3 gains less than REPLICA_GAIN
    assert "not worth their memory and traffic" in reason


def test_software_failures_alone_need_no_peers() -> None:
    decision, reason = recommend(paper.paper_scenario())
    assert decision.replicas == 1
    assert "peer copies never matter" in reason


def test_snapshot_blocking_lengthens_the_interval() -> None:
    blocking = replace(HARDWARE, training=TrainingSpec(snapshot_blocking_s=5))
    decision, reason = recommend(blocking)
    assert decision.interval_iterations > 1
    assert f"Why every {decision.interval_iterations} iterations" in reason


def test_nothing_fits_recommends_remote_checkpoints() -> None:
    decision, reason = recommend(HARDWARE, memory_budget_gb=100)
    assert decision.replicas == 0
    assert "no in-memory replicas fit 100 GB" in reason
    assert decision.interval_s == pytest.approx((2 * 480 * 86400 / 0.8) ** 0.5)


def test_helpers_and_errors() -> None:
    assert replica_memory_gb(HARDWARE, 2) == pytest.approx(300)
    assert candidate_intervals(40)[:3] == [1, 2, 3]
    assert candidate_intervals(40)[-1] == 40
    with pytest.raises(SimulationError, match="must be positive"):
        recommend(HARDWARE, memory_budget_gb=0)
