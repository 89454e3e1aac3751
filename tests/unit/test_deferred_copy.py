"""The background copy waits for an idle span of the training network, and no longer than needed.

It waits only as long as the agent's bound allows (`copy_by_s` of the begin grant): a copy held
back too long would commit after the windows its push needs.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from gemini_ckpt.interleave.profile import IdleProfile, IdleSpan
from gemini_ckpt.protocol.messages import parse_timing
from gemini_ckpt.snapshot.checkpointer import _Deferral, _save_job, copy_start
from gemini_ckpt.snapshot.writer import SaveTiming

PROFILE = IdleProfile(1.0, (IdleSpan(0.01, 0.002), IdleSpan(0.05, 0.03), IdleSpan(0.3, 0.2)))


class RecordingWriter:
    """Claims the slot, passes the agent's bound to the hold, notes when the copy started."""

    def __init__(self, copy_by: float | None = math.inf) -> None:
        self.copy_by = copy_by
        self.wrote_at: float | None = None
        self.committed = False

    def write(self, *args: Any) -> str:
        *_, before_copy = args
        before_copy(self.copy_by)  # the slot is claimed (the iteration's start reported) first
        self.wrote_at = time.monotonic()
        return "written"

    def commit(self, _flat: Any, _layout: Any, written: str, _timing: Any) -> None:
        self.committed = written == "written"


def test_the_copy_goes_to_the_earliest_span_that_holds_it():
    assert PROFILE.first_span_holding(0.001) == PROFILE.spans[0]
    assert PROFILE.first_span_holding(0.02) == PROFILE.spans[1]
    assert PROFILE.first_span_holding(0.1) == PROFILE.spans[2]
    assert PROFILE.first_span_holding(0.5) is None


def test_without_a_profile_a_bound_or_a_fitting_span_the_copy_starts_at_once():
    assert copy_start(None, 0.02, math.inf) == 0.0  # not profiled (interleaving off)
    assert copy_start(PROFILE, 0.02, None) == 0.0  # the agent sets no bound (not scheduled yet)
    assert copy_start(PROFILE, 0.02, math.inf) == 0.05
    assert copy_start(PROFILE, 0.0, math.inf) == 0.01  # no copy measured yet: the first span
    assert copy_start(PROFILE, 0.5, math.inf) == 0.0


def test_the_copy_must_end_by_the_agents_bound():
    assert copy_start(PROFILE, 0.02, 0.07) == 0.05  # 0.05 + 0.02 ends exactly at the bound
    assert copy_start(PROFILE, 0.02, 0.06) == 0.0  # too late for the push: at once
    assert copy_start(PROFILE, 0.001, 0.02) == 0.01


def test_a_deferred_copy_waits_its_delay_and_reports_it():
    writer, timing = RecordingWriter(), SaveTiming(step=3)
    started = time.monotonic()
    deferral = _Deferral(started, IdleProfile(1.0, (IdleSpan(0.05, 0.5),)))
    _save_job(writer, None, None, None, timing, deferral)  # type: ignore[arg-type]
    assert writer.wrote_at is not None and writer.wrote_at - started >= 0.05
    assert writer.committed
    assert 0.04 <= timing.deferred_s < 1.0
    assert parse_timing(timing.report("overlapped"))["deferred_s"] == timing.deferred_s


def test_the_delay_counts_from_the_iterations_start_not_from_the_grant():
    # The iteration began 0.2 s ago (the begin waited): the span at 0.05 s is already open.
    writer, timing = RecordingWriter(), SaveTiming(step=3)
    deferral = _Deferral(time.monotonic() - 0.2, IdleProfile(1.0, (IdleSpan(0.05, 0.5),)))
    _save_job(writer, None, None, None, timing, deferral)  # type: ignore[arg-type]
    assert writer.committed and timing.deferred_s == 0.0


def test_a_caller_that_needs_the_copy_starts_it_without_waiting_out_the_delay():
    writer, timing = RecordingWriter(), SaveTiming(step=3)
    deferral = _Deferral(time.monotonic(), IdleProfile(60.0, (IdleSpan(30.0, 1.0),)))
    job = threading.Thread(target=_save_job, args=(writer, None, None, None, timing, deferral))
    job.start()
    time.sleep(0.05)
    assert writer.wrote_at is None  # still deferred
    deferral.go.set()  # what wait() (the optimizer's pre-hook) does
    job.join(timeout=5)
    assert not job.is_alive() and writer.committed
    assert timing.deferred_s < 5


def test_an_undeferred_copy_reports_no_delay():
    timing = SaveTiming(step=1)
    writer = RecordingWriter(copy_by=None)  # e.g. the checkpoint does not fit one iteration
    _save_job(writer, None, None, None, timing, _Deferral(time.monotonic(), PROFILE))  # type: ignore[arg-type]
    assert writer.committed
    assert "deferred_s" not in timing.report("overlapped")
