"""Algorithm 2 (checkpoint traffic into idle spans): hand-computed plans and invariants."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gemini_ckpt.errors import ConfigError
from gemini_ckpt.interleave import (
    MAX_SPREAD_ITERATIONS,
    IdleProfile,
    IdleSpan,
    Schedule,
    TrafficConfig,
    idle_spans,
    latest_start,
    mean_profile,
    schedule_checkpoint,
    span_spread,
)

# Binary fractions keep every cost below exact, so hand-computed plans compare with ==.
TIGHT = 1e-9


def _traffic(**overrides: object) -> TrafficConfig:
    base = TrafficConfig(
        shard_bytes=300,
        remote_replicas=1,
        buffer_bytes=100,
        sub_buffers=2,
        bandwidth_bytes_per_s=100.0,
        latency_s=0.0,
        margin=1.0,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


# Two 1 s spans per 10 s iteration: 200 bytes per iteration at 100 B/s without latency.
TWO_SPANS = IdleProfile(10.0, (IdleSpan(1.0, 1.0), IdleSpan(5.0, 1.0)))


def _layout(schedule: Schedule) -> list[list[tuple[int, int, int, bool]]]:
    return [
        [(c.replica, c.offset, c.size, c.overflow) for c in plan.chunks] for plan in schedule.spans
    ]


def test_partial_chunks_fill_each_span_by_hand() -> None:
    # usable = 0.5 x (2, 1, 1.5) = (1.0, 0.5, 0.75) s; a 100-byte chunk costs 0.1 + 1.0 = 1.1 s,
    # so each span takes one partial chunk of (usable - 0.1) x 100 bytes: 90, 40 and 65.
    profile = IdleProfile(10.0, (IdleSpan(1.0, 2.0), IdleSpan(5.0, 1.0), IdleSpan(8.0, 1.5)))
    traffic = _traffic(shard_bytes=1000, buffer_bytes=200, latency_s=0.1, margin=0.5)
    schedule = schedule_checkpoint(profile, traffic)
    layout = _layout(schedule)
    assert layout[0] == [(0, 0, 90, False)]
    assert layout[1] == [(0, 90, 40, False)]
    assert layout[2][0] == (0, 130, 65, False)
    assert [size for _, _, size, _ in layout[2][1:]] == [100] * 8 + [5]
    assert all(overflow for *_, overflow in layout[2][1:])
    assert schedule.overflow_bytes == 1000 - 195
    assert schedule.overflow_seconds == pytest.approx(9 * 0.1 + 805 / 100)


def test_a_replica_tail_leaves_the_rest_of_the_span_to_the_next_copy() -> None:
    # Defects 2 and 4: 32 bytes end copy 0 (0.125 + 0.25 s), then copy 1 gets a whole 64-byte
    # chunk (0.125 + 0.5 s) in the same 1 s span; only m - 1 = 2 copies are sent, not 3.
    traffic = _traffic(
        shard_bytes=32, remote_replicas=2, buffer_bytes=64, sub_buffers=1,
        bandwidth_bytes_per_s=128.0, latency_s=0.125,
    )  # fmt: skip
    profile = IdleProfile(4.0, (IdleSpan(0.0, 1.0), IdleSpan(2.0, 1.0)))
    schedule = schedule_checkpoint(profile, traffic)
    assert _layout(schedule) == [[(0, 0, 32, False), (1, 0, 32, False)], []]
    assert [c.send_at for c in schedule.chunks] == [0.0, 0.375]
    assert schedule.interval_iterations == 1
    assert sum(c.size for c in schedule.chunks) == 64


def test_a_span_too_short_for_the_latency_carries_nothing() -> None:
    # Defect 1: 0.5 x 0.15 s < alpha + 1/B, so the first span is skipped instead of spinning.
    traffic = _traffic(shard_bytes=10, latency_s=0.1, margin=0.5)
    profile = IdleProfile(10.0, (IdleSpan(1.0, 0.15), IdleSpan(5.0, 1.0)))
    schedule = schedule_checkpoint(profile, traffic)
    assert _layout(schedule) == [[], [(0, 0, 10, False)]]


@pytest.mark.parametrize(
    ("shard", "interval", "t_ckpt"),
    [
        (200, 1, 6.0),  # both spans of the first iteration, ending at 5 + 1
        (300, 2, 12.0),  # 200 + 100: the second iteration's first span ends at 10 + 1 + 1
        (400, 2, 16.0),
        (500, 3, 22.0),  # 200 + 200 + 100
    ],
)
def test_interval_grows_when_the_checkpoint_does_not_fit(
    shard: int, interval: int, t_ckpt: float
) -> None:
    schedule = schedule_checkpoint(TWO_SPANS, _traffic(shard_bytes=shard))
    assert schedule.interval_iterations == interval
    assert schedule.checkpoint_seconds == t_ckpt
    assert schedule.overflow_bytes == max(0, shard - 200)
    if interval == 1:
        assert "checkpoint every iteration" in schedule.reason
    else:
        assert f"checkpoint every ceil(t_ckpt / T_iter) = {interval} iterations" in schedule.reason
        assert f"{shard - 200} bytes overflow the last span" in schedule.reason
    spread = schedule_checkpoint(TWO_SPANS, _traffic(shard_bytes=shard), iterations=interval)
    assert spread.overflow_bytes == 0
    assert spread.spans[-1].iteration == interval - 1
    assert spread.interval_iterations == interval


def test_many_iterations_are_skipped_not_packed() -> None:
    # 2 copies of 10^6 bytes at 200 bytes per iteration: 10^4 iterations, found arithmetically.
    traffic = _traffic(shard_bytes=1_000_000, remote_replicas=2, buffer_bytes=200_000)
    schedule = schedule_checkpoint(TWO_SPANS, traffic)
    assert schedule.interval_iterations == 10_000
    assert schedule.checkpoint_seconds == pytest.approx(9_999 * 10.0 + 6.0)


def test_no_usable_span_falls_back_to_the_transfer_time() -> None:
    traffic = _traffic(shard_bytes=2500, latency_s=1.0)  # every span is shorter than alpha
    schedule = schedule_checkpoint(TWO_SPANS, traffic)
    assert schedule.overflow_bytes == 2500
    assert schedule.transfer_seconds == pytest.approx(50 * 1.0 + 25.0)
    assert schedule.interval_iterations == 8  # ceil(75 s / 10 s)
    assert "cannot use the idle time" in schedule.reason


def test_nothing_to_send_with_a_single_copy() -> None:
    schedule = schedule_checkpoint(TWO_SPANS, _traffic(remote_replicas=0))
    assert schedule.chunks == ()
    assert schedule.interval_iterations == 1
    assert schedule.reason.startswith("nothing to send")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"shard_bytes": -1}, "shard_bytes"),
        ({"shard_bytes": 1.5}, "shard_bytes"),
        ({"remote_replicas": -1}, "remote_replicas"),
        ({"remote_replicas": True}, "remote_replicas"),
        ({"sub_buffers": 0}, "sub_buffers"),
        ({"buffer_bytes": 1, "sub_buffers": 2}, "buffer_bytes"),
        ({"bandwidth_bytes_per_s": 0.0}, "bandwidth_bytes_per_s"),
        ({"bandwidth_bytes_per_s": math.inf}, "bandwidth_bytes_per_s"),
        ({"latency_s": -0.1}, "latency_s"),
        ({"latency_s": math.nan}, "latency_s"),
        ({"margin": 0.0}, "margin"),
        ({"margin": 1.5}, "margin"),
        ({"shard_bytes": 10**9, "buffer_bytes": 2, "sub_buffers": 2}, "buffer_bytes"),
    ],
)
def test_invalid_traffic_is_rejected_naming_the_field(
    overrides: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        _traffic(**overrides)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: IdleSpan(-1.0, 1.0), "start"),
        (lambda: IdleSpan(0.0, 0.0), "length"),
        (lambda: IdleSpan(0.0, math.inf), "length"),
        (lambda: IdleProfile(0.0, ()), "iteration_seconds"),
        (lambda: IdleProfile(10.0, (IdleSpan(5.0, 1.0), IdleSpan(1.0, 1.0))), r"spans\[1\]"),
        (lambda: IdleProfile(10.0, (IdleSpan(1.0, 2.0), IdleSpan(2.5, 1.0))), r"spans\[1\]"),
        (lambda: IdleProfile(10.0, (IdleSpan(9.0, 2.0),)), r"spans\[0\].*iteration_seconds"),
        (lambda: schedule_checkpoint(IdleProfile(10.0, ()), _traffic()), "profile.spans"),
        (lambda: schedule_checkpoint(TWO_SPANS, _traffic(), iterations=0), "iterations"),
        (
            lambda: schedule_checkpoint(
                TWO_SPANS, _traffic(), iterations=MAX_SPREAD_ITERATIONS + 1
            ),
            "iterations",
        ),
    ],
)
def test_invalid_profile_or_request_is_rejected_naming_the_field(build: object, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        build()  # type: ignore[operator]


@st.composite
def _profiles(draw: st.DrawFn) -> IdleProfile:
    count = draw(st.integers(1, 5))
    spans, cursor = [], 0.0
    for _ in range(count):
        cursor += draw(st.floats(0.0, 2.0))
        length = draw(st.floats(0.01, 3.0))
        spans.append(IdleSpan(cursor, length))
        cursor += length
    return IdleProfile(cursor + draw(st.floats(0.0, 2.0)) + 0.01, tuple(spans))


@st.composite
def _traffics(draw: st.DrawFn) -> TrafficConfig:
    sub_buffers = draw(st.integers(1, 4))
    return TrafficConfig(
        shard_bytes=draw(st.integers(0, 3000)),
        remote_replicas=draw(st.integers(0, 3)),
        buffer_bytes=draw(st.integers(sub_buffers, 400)),
        sub_buffers=sub_buffers,
        bandwidth_bytes_per_s=draw(st.floats(50.0, 5000.0)),
        latency_s=draw(st.floats(0.0, 0.3)),
        margin=draw(st.floats(0.05, 1.0)),
    )


def _check_invariants(schedule: Schedule, traffic: TrafficConfig) -> None:
    chunks = schedule.chunks
    # bytes conserved: each copy exactly once, from byte 0 to its end, copies in order
    expected, replica, offset = [], 0, 0
    for chunk in chunks:
        expected.append((replica, offset))
        offset += chunk.size
        if offset == traffic.shard_bytes:
            replica, offset = replica + 1, 0
    assert [(c.replica, c.offset) for c in chunks] == expected
    assert sum(c.size for c in chunks) == traffic.total_bytes
    assert (replica, offset) == ((traffic.remote_replicas, 0) if chunks else (0, 0))
    assert all(1 <= c.size <= traffic.buffer_bytes // traffic.sub_buffers for c in chunks)
    for position, plan in enumerate(schedule.spans):
        fitting = [c for c in plan.chunks if not c.overflow]
        overflow = plan.chunks[len(fitting) :]
        assert all(c.overflow for c in overflow)  # overflow comes after the fitting chunks
        if position < len(schedule.spans) - 1:
            assert not overflow
        used = math.fsum(traffic.cost(c.size) for c in fitting)
        assert used <= plan.usable_seconds * (1 + TIGHT)
        assert plan.usable_seconds <= plan.span.length
        for chunk in fitting:
            assert plan.span.start <= chunk.send_at
            assert chunk.send_at + traffic.cost(chunk.size) <= plan.span.end * (1 + TIGHT)
    assert schedule.overflow_bytes == sum(c.size for c in chunks if c.overflow)


@given(_profiles(), _traffics())
@settings(max_examples=80, deadline=None)
def test_schedule_invariants(profile: IdleProfile, traffic: TrafficConfig) -> None:
    schedule = schedule_checkpoint(profile, traffic)
    _check_invariants(schedule, traffic)
    assert schedule_checkpoint(profile, traffic) == schedule  # deterministic
    if "cannot use the idle time" not in schedule.reason:
        assert (schedule.overflow_bytes == 0) == (schedule.interval_iterations == 1)


@given(_profiles(), _traffics())
@settings(max_examples=60, deadline=None)
def test_interval_is_the_fewest_iterations_without_overflow(
    profile: IdleProfile, traffic: TrafficConfig
) -> None:
    # schedule_checkpoint(iterations=k) packs every iteration chunk by chunk, so this checks the
    # interval, found by skipping whole iterations, against plain packing.
    first = schedule_checkpoint(profile, traffic)
    interval = first.interval_iterations
    assume("cannot use the idle time" not in first.reason and interval <= 40)
    spread = schedule_checkpoint(profile, traffic, iterations=interval)
    _check_invariants(spread, traffic)
    assert spread.overflow_bytes == 0
    if interval > 1:
        assert schedule_checkpoint(profile, traffic, iterations=interval - 1).overflow_bytes > 0
        last = spread.chunks[-1]
        finish = (interval - 1) * profile.iteration_seconds + last.send_at
        assert first.checkpoint_seconds == pytest.approx(finish + traffic.cost(last.size))
    period = profile.iteration_seconds
    assert (interval - 1) * period < first.checkpoint_seconds or traffic.total_bytes == 0
    assert first.checkpoint_seconds <= interval * period * (1 + TIGHT)


def test_latest_start_by_hand() -> None:
    # Three 1 s spans (100 bytes each at 100 B/s) in a 10 s iteration.
    three = IdleProfile(10.0, (IdleSpan(1.0, 1.0), IdleSpan(4.0, 1.0), IdleSpan(7.0, 1.0)))
    # 150 bytes need two spans: a push that starts by the second span's start still fits.
    assert latest_start(three, _traffic(shard_bytes=150)) == 4.0
    assert latest_start(three, _traffic(shard_bytes=100)) == 7.0  # the last span holds it all
    assert latest_start(three, _traffic(shard_bytes=300)) == 1.0  # needs every span
    assert latest_start(three, _traffic(shard_bytes=301)) == 0.0  # does not fit one iteration
    assert latest_start(three, _traffic(remote_replicas=0)) == 10.0  # nothing to send


@given(_profiles(), _traffics())
@settings(max_examples=60, deadline=None)
def test_what_follows_the_latest_start_carries_the_checkpoint(
    profile: IdleProfile, traffic: TrafficConfig
) -> None:
    latest = latest_start(profile, traffic)
    schedule = schedule_checkpoint(profile, traffic)
    fits = schedule.interval_iterations == 1 and schedule.overflow_bytes == 0
    rest = [span for span in profile.spans if span.start >= latest]
    if traffic.total_bytes == 0:
        assert latest == profile.iteration_seconds
    elif not fits:
        assert latest == 0.0
    else:
        assert rest and latest == rest[0].start
        after = schedule_checkpoint(IdleProfile(profile.iteration_seconds, tuple(rest)), traffic)
        assert after.overflow_bytes == 0
        later = rest[1:]  # starting from the next span on would not fit
        if later:
            tail = IdleProfile(profile.iteration_seconds, tuple(later))
            assert schedule_checkpoint(tail, traffic).overflow_bytes > 0


def _spans(profile: IdleProfile) -> list[tuple[float, float]]:
    return [(span.start, span.length) for span in profile.spans]


def test_overlapping_collectives_are_merged() -> None:
    profile = idle_spans([(6.0, 7.0), (1.0, 3.0), (2.0, 4.0), (4.0, 5.0)], 10.0)
    assert _spans(profile) == [(0.0, 1.0), (5.0, 1.0), (7.0, 3.0)]


def test_spans_at_the_iterations_start_and_end() -> None:
    assert _spans(idle_spans([(2.0, 3.0)], 5.0)) == [(0.0, 2.0), (3.0, 2.0)]
    assert _spans(idle_spans([(0.0, 1.0), (4.0, 5.0)], 5.0)) == [(1.0, 3.0)]
    assert _spans(idle_spans([], 5.0)) == [(0.0, 5.0)]
    assert _spans(idle_spans([(0.0, 5.0)], 5.0)) == []


def test_collectives_are_clipped_to_the_iteration() -> None:
    assert _spans(idle_spans([(-1.0, 1.0), (9.0, 12.0), (20.0, 21.0)], 10.0)) == [(1.0, 8.0)]


def test_short_gaps_are_dropped() -> None:
    profile = idle_spans([(1.0, 2.0), (2.05, 3.0)], 4.0, min_span_seconds=0.1)
    assert _spans(profile) == [(0.0, 1.0), (3.0, 1.0)]


@pytest.mark.parametrize(
    ("busy", "period", "minimum", "field"),
    [
        ([(2.0, 1.0)], 10.0, 0.0, r"busy\[0\]"),
        ([(0.0, 1.0), (1.0, math.nan)], 10.0, 0.0, r"busy\[1\]"),
        ([], 0.0, 0.0, "iteration_seconds"),
        ([], 10.0, -1.0, "min_span_seconds"),
    ],
)
def test_invalid_busy_intervals_are_rejected(
    busy: list[tuple[float, float]], period: float, minimum: float, field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        idle_spans(busy, period, minimum)


_busy = st.lists(
    st.tuples(st.floats(-1.0, 11.0), st.floats(0.0, 3.0)).map(lambda p: (p[0], p[0] + p[1])),
    max_size=8,
)


@given(_busy)
@settings(max_examples=80, deadline=None)
def test_idle_and_busy_time_partition_the_iteration(busy: list[tuple[float, float]]) -> None:
    profile = idle_spans(busy, 10.0)
    for span in profile.spans:
        for start, end in busy:
            overlap = min(end, span.end) - max(start, span.start)
            assert overlap <= TIGHT  # an idle span never overlaps a collective
    grid = [i / 100 + 0.005 for i in range(1000)]  # sample points: idle xor busy
    for t in grid:
        idle = any(s.start < t < s.end for s in profile.spans)
        blocked = any(start <= t <= end for start, end in busy)
        assert idle != blocked or any(abs(t - x) < 1e-6 for pair in busy for x in pair)


def test_spread_and_mean_of_profiles() -> None:
    profiles = [
        IdleProfile(10.0, (IdleSpan(1.0, 1.0), IdleSpan(5.0, 2.0))),
        IdleProfile(11.0, (IdleSpan(1.2, 1.2), IdleSpan(5.0, 2.0))),
        IdleProfile(12.0, (IdleSpan(0.8, 0.8), IdleSpan(5.0, 2.0))),
    ]
    first, second = span_spread(profiles)
    assert first.mean_length == pytest.approx(1.0)
    assert first.normalised_std == pytest.approx(math.sqrt(0.08 / 3))
    assert (second.mean_length, second.normalised_std) == (2.0, 0.0)
    mean = mean_profile(profiles)
    assert mean.iteration_seconds == pytest.approx(11.0)
    assert [(s.start, s.length) for s in mean.spans] == [
        pytest.approx((1.0, 1.0)),
        pytest.approx((5.0, 2.0)),
    ]


def test_spread_needs_matching_positions() -> None:
    one = IdleProfile(10.0, (IdleSpan(1.0, 1.0),))
    two = IdleProfile(10.0, (IdleSpan(1.0, 1.0), IdleSpan(5.0, 1.0)))
    with pytest.raises(ConfigError, match=r"profiles\[1\] has 2 idle spans"):
        span_spread([one, two])
    with pytest.raises(ConfigError, match="profiles is empty"):
        mean_profile([])
