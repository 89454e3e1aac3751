"""The pacer: chunks start only inside the idle windows of the iteration under way."""

from __future__ import annotations

import threading
import time

import pytest

from gemini_ckpt.interleave import IdleProfile, IdleSpan, TrafficConfig
from gemini_ckpt.interleave.pacer import LinkPacer

# One iteration of 1 s: idle 0-0.4 s and 0.6-0.9 s. 100 bytes/s, no latency, all of a span usable.
PROFILE = IdleProfile(1.0, (IdleSpan(0.0, 0.4), IdleSpan(0.6, 0.3)))
TRAFFIC = TrafficConfig(
    shard_bytes=100,
    remote_replicas=1,
    buffer_bytes=20,
    sub_buffers=1,
    bandwidth_bytes_per_s=100.0,
    latency_s=0.0,
    margin=1.0,
)


def _pacer(now: float = 0.0, stall_s: float = 5.0) -> LinkPacer:
    pacer = LinkPacer(stall_s=stall_s, clock=lambda: now)
    pacer.configure(PROFILE, TRAFFIC)
    return pacer


def test_without_a_profile_every_chunk_goes_at_once():
    pacer = LinkPacer()
    assert pacer.next_grant(10**9, 7.0) == (7.0, "unpaced", 10**9)
    assert not pacer.pacing


def test_before_any_iteration_is_reported_nothing_is_granted():
    assert _pacer().next_grant(10, 0.0) is None


def test_a_chunk_starts_in_the_first_window_that_still_holds_it():
    pacer = _pacer()
    pacer.iteration_started(step=5, at=100.0)
    assert pacer.next_grant(10, 100.1) == (100.1, "in_window", 10)
    # 0.35 s in, 10 bytes (0.1 s) would end after the first window: it waits for the second.
    assert pacer.next_grant(10, 100.35) == (100.6, "in_window", 10)
    # 30 bytes (0.3 s) asked for 0.15 s in no longer fit the first window: the second, exactly.
    assert pacer.next_grant(30, 100.15) == (100.6, "in_window", 30)


def test_after_the_last_window_a_chunk_waits_for_the_next_iteration():
    pacer = _pacer()
    pacer.iteration_started(step=5, at=100.0)
    assert pacer.next_grant(10, 100.85) is None
    pacer.iteration_started(step=6, at=101.02)
    assert pacer.next_grant(10, 101.05) == (101.05, "in_window", 10)


def test_ranks_of_one_machine_anchor_the_iteration_at_the_earliest_start():
    pacer = _pacer()
    pacer.iteration_started(step=5, at=100.2)
    pacer.iteration_started(step=5, at=100.0)
    pacer.iteration_started(step=4, at=99.0)  # an older iteration's report changes nothing
    assert pacer.next_grant(10, 100.35) == (100.6, "in_window", 10)


def test_the_margin_shrinks_every_window():
    pacer = _pacer()
    pacer.configure(PROFILE, TrafficConfig(**{**TRAFFIC.__dict__, "margin": 0.5}))
    pacer.iteration_started(step=1, at=0.0)
    # Usable: 0-0.2 s and 0.6-0.75 s. 10 bytes at 0.15 s would end at 0.25 s.
    assert pacer.next_grant(10, 0.15) == (0.6, "in_window", 10)
    assert pacer.next_grant(20, 0.0) is None or pacer.next_grant(20, 0.0) == (0.0, "in_window", 20)


def test_a_chunk_larger_than_any_window_goes_at_the_last_span_as_overflow():
    pacer = _pacer()
    pacer.iteration_started(step=1, at=0.0)
    assert pacer.next_grant(50, 0.1) == (0.6, "overflow", 50)
    assert pacer.next_grant(50, 0.95) is None


def test_when_training_stops_reporting_iterations_chunks_go_unpaced():
    pacer = _pacer(stall_s=1.0)
    pacer.iteration_started(step=1, at=0.0)
    assert pacer.next_grant(10, 1.9) is None
    assert pacer.next_grant(10, 2.1) == (2.1, "unpaced", 10)


def test_grants_reserve_the_link_so_two_senders_do_not_overlap():
    clock = [100.0]
    pacer = LinkPacer(stall_s=5.0, clock=lambda: clock[0])
    pacer.configure(PROFILE, TRAFFIC)
    pacer.iteration_started(step=1, at=100.0)
    assert pacer.acquire(20) == 20  # 0.2 s of link time: 100.0-100.2
    assert pacer.next_grant(20, 100.0) == (100.2, "in_window", 20)
    assert pacer.next_grant(30, 100.0) == (100.6, "in_window", 30)
    assert pacer.stats.chunks == 1
    assert pacer.stats.in_window == 1


def test_acquire_waits_in_real_time_and_can_be_cancelled():
    pacer = LinkPacer(stall_s=30.0)
    pacer.configure(IdleProfile(1.0, (IdleSpan(0.3, 0.5),)), TRAFFIC)
    started = time.monotonic()
    pacer.iteration_started(step=1, at=started)
    assert pacer.acquire(10) == 10
    assert time.monotonic() - started >= 0.29
    # 0.45 s no longer fits what is left of the window (the link is reserved until 0.4 s), and
    # the next iteration never starts: only cancellation ends the wait.
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    assert pacer.acquire(45, stop.is_set) == 0


def test_reset_forgets_the_iterations_of_the_previous_generation():
    pacer = _pacer()
    pacer.iteration_started(step=9, at=100.0)
    pacer.reset()
    assert pacer.next_grant(10, 100.1) is None
    pacer.iteration_started(step=1, at=200.0)  # step numbers may restart lower
    assert pacer.next_grant(10, 200.0) == (200.0, "in_window", 10)


@pytest.mark.parametrize("nbytes", [1, 10, 40])
def test_a_granted_chunk_always_ends_inside_its_window(nbytes):
    pacer = _pacer()
    pacer.iteration_started(step=1, at=0.0)
    for tenth in range(10):
        grant = pacer.next_grant(nbytes, tenth / 10)
        if grant is None or grant.kind != "in_window":
            continue
        start, end = grant.at, grant.at + TRAFFIC.cost(grant.nbytes)
        assert any(s.start <= start and end <= s.end + 1e-12 for s in PROFILE.spans)


def test_a_chunk_that_does_not_fit_whole_gets_the_piece_that_fills_the_window():
    pacer = _pacer()
    pacer.iteration_started(step=1, at=0.0)
    # 0.35 s in, 0.05 s are left of the first window: 5 bytes of the 10 asked for.
    assert pacer.next_grant(10, 0.35, min_bytes=4) == (0.35, "in_window", 5)
    # A piece smaller than min_bytes is not worth a frame: the next window, whole.
    assert pacer.next_grant(10, 0.35, min_bytes=6) == (0.6, "in_window", 10)
    # Without min_bytes only the whole chunk is granted (as before pieces existed).
    assert pacer.next_grant(10, 0.35) == (0.6, "in_window", 10)


def test_pieces_keep_a_large_chunk_out_of_the_overflow():
    pacer = _pacer()
    pacer.iteration_started(step=1, at=0.0)
    # 50 bytes fit no window whole, but 40 fit the first: no need to overflow the last span.
    assert pacer.next_grant(50, 0.0, min_bytes=10) == (0.0, "in_window", 40)
    # Smallest piece larger than any window: overflow, all of it.
    assert pacer.next_grant(50, 0.0, min_bytes=45) == (0.6, "overflow", 50)


def test_acquire_reserves_only_the_piece_it_granted():
    clock = [0.35]
    pacer = LinkPacer(stall_s=5.0, clock=lambda: clock[0])
    pacer.configure(PROFILE, TRAFFIC)
    pacer.iteration_started(step=1, at=0.0)
    assert pacer.acquire(10, min_bytes=1) == 5
    assert pacer.stats.bytes == 5 and pacer.stats.in_window == 1
    assert pacer.next_grant(10, 0.35, min_bytes=1) == (0.6, "in_window", 10)  # link busy to 0.4


@pytest.mark.parametrize("nbytes", [10, 40, 90])
def test_a_granted_piece_always_ends_inside_its_window(nbytes):
    pacer = _pacer()
    pacer.iteration_started(step=1, at=0.0)
    for hundredth in range(100):
        grant = pacer.next_grant(nbytes, hundredth / 100, min_bytes=1)
        if grant is None or grant.kind != "in_window":
            continue
        assert 1 <= grant.nbytes <= nbytes
        start, end = grant.at, grant.at + TRAFFIC.cost(grant.nbytes)
        assert any(s.start <= start and end <= s.end + 1e-12 for s in PROFILE.spans)
