"""The background copy waits for an idle span of the training network, and no longer than needed."""

from __future__ import annotations

import threading
import time
from typing import Any

from gemini_ckpt.interleave.profile import IdleProfile, IdleSpan
from gemini_ckpt.protocol.messages import parse_timing
from gemini_ckpt.snapshot.checkpointer import StateCheckpointer, _Deferral, _save_job
from gemini_ckpt.snapshot.writer import SaveTiming

PROFILE = IdleProfile(1.0, (IdleSpan(0.01, 0.002), IdleSpan(0.05, 0.03), IdleSpan(0.3, 0.2)))


class RecordingWriter:
    """Notes when the copy started and whether the commit followed it."""

    def __init__(self) -> None:
        self.wrote_at: float | None = None
        self.committed = False

    def write(self, *args: Any) -> str:
        *_, before_copy = args
        before_copy()  # the slot is claimed (and the iteration's start reported) before the hold
        self.wrote_at = time.monotonic()
        return "written"

    def commit(self, _flat: Any, _layout: Any, written: str, _timing: Any) -> None:
        self.committed = written == "written"


def test_the_copy_goes_to_the_earliest_span_that_holds_it():
    assert PROFILE.first_span_holding(0.001) == PROFILE.spans[0]
    assert PROFILE.first_span_holding(0.02) == PROFILE.spans[1]
    assert PROFILE.first_span_holding(0.1) == PROFILE.spans[2]
    assert PROFILE.first_span_holding(0.5) is None


def test_without_a_profile_or_a_fitting_span_the_copy_starts_at_once():
    ckpt = StateCheckpointer(object())  # type: ignore[arg-type]
    assert ckpt._copy_delay(0.02) == 0.0  # not profiled (interleaving off)
    ckpt._idle = PROFILE
    assert ckpt._copy_delay(0.02) == 0.05
    assert ckpt._copy_delay(0.0) == 0.01  # no copy measured yet: the first span
    assert ckpt._copy_delay(0.5) == 0.0


def test_a_deferred_copy_waits_its_delay_and_reports_it():
    writer, timing = RecordingWriter(), SaveTiming(step=3)
    started = time.monotonic()
    deferral = _Deferral(started + 0.05)
    _save_job(writer, None, None, None, timing, deferral)  # type: ignore[arg-type]
    assert writer.wrote_at is not None and writer.wrote_at - started >= 0.05
    assert writer.committed
    assert 0.05 <= timing.deferred_s < 1.0
    assert parse_timing(timing.report("overlapped"))["deferred_s"] == timing.deferred_s


def test_a_caller_that_needs_the_copy_starts_it_without_waiting_out_the_delay():
    writer, timing, deferral = (
        RecordingWriter(),
        SaveTiming(step=3),
        _Deferral(time.monotonic() + 30),
    )
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
    _save_job(RecordingWriter(), None, None, None, timing, _Deferral(0.0))  # type: ignore[arg-type]
    assert "deferred_s" not in timing.report("overlapped")
