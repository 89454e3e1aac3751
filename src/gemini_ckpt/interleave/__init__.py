"""Checkpoint traffic interleaving: send checkpoint chunks while training leaves the network idle.

Pure functions and values, no I/O. A profiler turns the busy intervals of training collectives into
an `IdleProfile` (`idle_spans()`, checked for stability with `span_spread()` and averaged with
`mean_profile()`); `schedule_checkpoint()` is the policy entry point, the paper's Algorithm 2 with
its printed defects corrected (listed in `gemini_ckpt.interleave.schedule`): a chunk plan per idle
span, the checkpoint interval, and the reason for it.
"""

from gemini_ckpt.interleave.profile import (
    IdleProfile,
    IdleSpan,
    SpanSpread,
    idle_spans,
    mean_profile,
    span_spread,
)
from gemini_ckpt.interleave.schedule import (
    MAX_SPREAD_ITERATIONS,
    Schedule,
    largest_fitting_chunk,
    latest_start,
    schedule_checkpoint,
    span_capacity,
)
from gemini_ckpt.interleave.traffic import MAX_CHUNKS, Chunk, SpanPlan, TrafficConfig

__all__ = [
    "MAX_CHUNKS",
    "MAX_SPREAD_ITERATIONS",
    "Chunk",
    "IdleProfile",
    "IdleSpan",
    "Schedule",
    "SpanPlan",
    "SpanSpread",
    "TrafficConfig",
    "idle_spans",
    "largest_fitting_chunk",
    "latest_start",
    "mean_profile",
    "schedule_checkpoint",
    "span_capacity",
    "span_spread",
]
