"""Pushes paced into idle windows: units of R/p bytes (or the piece a window holds), at most p
unacknowledged, real TCP."""

from __future__ import annotations

import threading
import time

import pytest
from test_replication import SIZE, machines  # noqa: F401  (the fixture)

from gemini_ckpt.interleave import IdleProfile, IdleSpan, TrafficConfig
from gemini_ckpt.interleave.pacer import LinkPacer
from gemini_ckpt.replication import Pacing, PushResult, PushStatus
from helpers.replicas import commit, payload, read

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CHUNK = 64 << 10


def _pacer(window_s: float, bandwidth: float) -> LinkPacer:
    """One idle window per iteration: [0.2 s, 0.2 s + window_s] of a 1 s iteration."""
    pacer = LinkPacer(stall_s=30.0)
    traffic = TrafficConfig(SIZE, 1, 2 * CHUNK, 1, bandwidth, 0.0, 1.0)
    pacer.configure(IdleProfile(1.0, (IdleSpan(0.2, window_s),)), traffic)
    return pacer


def _push_over_two_iterations(
    machines,  # noqa: F811
    pacer: LinkPacer,
    pacing: Pacing,
) -> tuple[PushResult, float]:
    """Push step 1 of rank 0 while iterations start now and 1 s later; (result, seconds taken)."""
    ref = commit(machines.own, 0, 1, payload(SIZE, 1))
    started = time.monotonic()
    pacer.iteration_started(0, started)
    threading.Timer(1.0, lambda: pacer.iteration_started(1, started + 1.0)).start()
    with machines.link() as link:
        result = link.push(machines.own, ref, 0, pacing=pacing)
    return result, time.monotonic() - started


@pytest.mark.parametrize("window", [1, 4])
def test_a_paced_push_with_acknowledged_units_lands_bit_identical(machines, window):  # noqa: F811
    pacer = LinkPacer()  # no profile: every unit granted at once, acknowledgements still flow
    pacing = Pacing(pacer, unit_bytes=2 * CHUNK, window=window)
    with machines.link() as link:
        for step in (1, 2):
            ref = commit(machines.own, 0, step, payload(SIZE, step))
            result = link.push(machines.own, ref, 0, pacing=pacing)
            assert result.ok, result.describe()
    assert read(machines.replicas, 0, 2) == payload(SIZE, 2)
    assert pacer.stats.chunks == 2 * 3  # 5 chunks in units of 2: 3 units per push
    assert pacer.stats.unpaced == 6


def test_units_wait_for_the_idle_window_of_the_iteration(machines):  # noqa: F811
    # 1 MB/s: a unit of 128 KiB costs 0.13 s, so a 0.3 s window holds two; the third unit
    # waits for the next iteration's window.
    pacer = _pacer(window_s=0.3, bandwidth=1e6)
    result, elapsed = _push_over_two_iterations(
        machines, pacer, Pacing(pacer, unit_bytes=2 * CHUNK, window=1)
    )
    assert result.ok, result.describe()
    assert pacer.stats.in_window == 3
    assert 1.2 <= elapsed < 5.0  # the last unit went in the second iteration's window
    assert read(machines.replicas, 0, 1) == payload(SIZE, 1)


def test_a_unit_that_does_not_fit_the_window_goes_in_pieces(machines):  # noqa: F811
    # 1 MB/s, 0.29 s window: two whole units (0.262 s), then the bytes that fit the rest of the
    # window (up to 28 000, cut inside a chunk), and what is left of the 300 000 in the next
    # iteration's window.
    pacer = _pacer(window_s=0.29, bandwidth=1e6)
    result, elapsed = _push_over_two_iterations(
        machines, pacer, Pacing(pacer, unit_bytes=2 * CHUNK, window=2, min_piece_bytes=4 << 10)
    )
    assert result.ok, result.describe()
    assert pacer.stats.chunks == 4 and pacer.stats.in_window == 4
    assert pacer.stats.bytes == SIZE
    assert elapsed >= 1.2  # the last piece waited for the next window
    assert read(machines.replicas, 0, 1) == payload(SIZE, 1)


def test_a_cancelled_wait_aborts_the_push_and_the_peer_keeps_its_replica(machines):  # noqa: F811
    pacer = _pacer(window_s=0.3, bandwidth=1e6)
    ref1 = commit(machines.own, 0, 1, payload(SIZE, 1))
    with machines.link() as link:
        assert link.push(machines.own, ref1, 0).ok
        ref2 = commit(machines.own, 0, 2, payload(SIZE, 2))
        pacer.iteration_started(0, time.monotonic())
        stop = threading.Event()
        threading.Timer(0.8, stop.set).start()
        pacing = Pacing(pacer, unit_bytes=2 * CHUNK, window=2, cancelled=stop.is_set)
        result = link.push(machines.own, ref2, 0, pacing=pacing)
        assert result.status is PushStatus.SKIPPED
        assert result.reason == "the push was cancelled"
        assert 0 < result.nbytes < SIZE
        # the connection stays in step: an unpaced push of the same step goes through
        assert link.push(machines.own, ref2, 0).ok
    assert machines.replicas.inventory() == {0: [1, 2]}


def test_a_paced_push_sends_a_staged_copy_so_the_trainer_may_reuse_the_slot(machines):  # noqa: F811
    own = machines.own
    pacer = _pacer(window_s=0.3, bandwidth=1e6)
    pacing = Pacing(pacer, unit_bytes=2 * CHUNK, window=1)
    ref = commit(own, 0, 1, payload(SIZE, 1))
    started = time.monotonic()
    pacer.iteration_started(0, started)

    def trainer_saves_twice_more():  # while the push waits for the next window
        commit(own, 0, 2, payload(SIZE, 2))
        commit(own, 0, 3, payload(SIZE, 3))  # step 1's slot is rewritten
        pacer.iteration_started(1, started + 1.0)

    threading.Timer(0.6, trainer_saves_twice_more).start()
    with machines.link() as link:
        result = link.push(own, ref, 0, pacing=pacing)
    assert result.ok, result.describe()
    assert own.locate(0, 1) is None
    assert read(machines.replicas, 0, 1) == payload(SIZE, 1)
