"""Idle spans of the training network within one iteration, and how stable they are.

A profiler timestamps the start and end of every training collective during the first iterations
(the paper profiles about 20 without checkpointing) and hands the busy intervals to `idle_spans()`.
What is left of [0, T_iter] once the busy intervals are merged is where checkpoint traffic can go.
`span_spread()` says how much each span's length varies across iterations (the paper reports a
normalised standard deviation under 10 %), and `mean_profile()` averages them position by position,
as the paper does (its artifact took the minimum instead).

Times are seconds from the start of the iteration.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from gemini_ckpt.errors import ConfigError

# Profiler timestamps are microseconds at best. A nanosecond of rounding in `start + length` is not
# an overlap and must not reject a profile derived from real timestamps.
OVERLAP_TOLERANCE_S = 1e-9


@dataclass(frozen=True)
class IdleSpan:
    """A stretch of one iteration during which no training collective uses the network.

    Attributes:
        start: Seconds from the start of the iteration, >= 0.
        length: Duration in seconds, > 0.
    """

    start: float
    length: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.start) or self.start < 0:
            raise ConfigError(f"idle span start must be a finite number >= 0 s, got {self.start}")
        if not math.isfinite(self.length) or self.length <= 0:
            raise ConfigError(f"idle span length must be a finite number > 0 s, got {self.length}")

    @property
    def end(self) -> float:
        """Seconds from the start of the iteration at which the span ends."""
        return self.start + self.length


@dataclass(frozen=True)
class IdleProfile:
    """The idle spans of one (typical) iteration.

    Attributes:
        iteration_seconds: T_iter, the iteration time, > 0.
        spans: Idle spans sorted by start, not overlapping, inside [0, T_iter]. May be empty when
            the network never rests; scheduling then refuses the profile.
    """

    iteration_seconds: float
    spans: tuple[IdleSpan, ...]

    def __post_init__(self) -> None:
        period = self.iteration_seconds
        if not math.isfinite(period) or period <= 0:
            raise ConfigError(f"iteration_seconds must be a finite number > 0, got {period}")
        object.__setattr__(self, "spans", tuple(self.spans))
        previous_end = 0.0
        for index, span in enumerate(self.spans):
            if not isinstance(span, IdleSpan):
                raise ConfigError(f"spans[{index}] is a {type(span).__name__}, not an IdleSpan")
            if span.start < previous_end - OVERLAP_TOLERANCE_S:
                raise ConfigError(
                    f"spans[{index}] starts at {span.start} s, before spans[{index - 1}] ends at "
                    f"{previous_end} s: idle spans must be sorted and must not overlap"
                )
            if span.end > period + OVERLAP_TOLERANCE_S:
                raise ConfigError(
                    f"spans[{index}] ends at {span.end} s, after the iteration's "
                    f"iteration_seconds={period}"
                )
            previous_end = span.end

    @property
    def idle_seconds(self) -> float:
        """Total idle time of the iteration."""
        return math.fsum(span.length for span in self.spans)

    def first_span_holding(self, seconds: float, ends_by: float = math.inf) -> IdleSpan | None:
        """The earliest span holding `seconds` that end by `ends_by` (None when none does)."""
        return next(
            (
                span
                for span in self.spans
                if span.length >= seconds and span.start + seconds <= ends_by
            ),
            None,
        )


@dataclass(frozen=True)
class SpanSpread:
    """How much the span at one position varies across profiled iterations.

    Attributes:
        index: Position of the span within its iteration.
        mean_length: Mean length in seconds.
        std_length: Population standard deviation of the length in seconds.
        normalised_std: `std_length / mean_length` (the paper's "normalised std dev").
    """

    index: int
    mean_length: float
    std_length: float
    normalised_std: float


def idle_spans(
    busy: Sequence[tuple[float, float]],
    iteration_seconds: float,
    min_span_seconds: float = 0.0,
) -> IdleProfile:
    """Derive an iteration's idle spans from the busy intervals of its training collectives.

    Intervals are clipped to [0, iteration_seconds], overlapping or touching ones are merged, and
    the gaps between them, before the first and after the last included, become idle spans.

    Args:
        busy: (start, end) seconds from the iteration's start of every collective, in any order.
        iteration_seconds: T_iter.
        min_span_seconds: Gaps no longer than this are dropped (the paper's artifact dropped gaps
            under 100 ms: they cannot carry a chunk once the per-transfer latency is paid).

    Returns:
        The idle profile of the iteration.

    Raises:
        ConfigError: an interval ends before it starts or is not finite, or `iteration_seconds`
            or `min_span_seconds` is invalid.
    """
    if not math.isfinite(iteration_seconds) or iteration_seconds <= 0:
        raise ConfigError(f"iteration_seconds must be a finite number > 0, got {iteration_seconds}")
    if not math.isfinite(min_span_seconds) or min_span_seconds < 0:
        raise ConfigError(f"min_span_seconds must be a finite number >= 0, got {min_span_seconds}")
    clipped = []
    for index, (start, end) in enumerate(busy):
        if not (math.isfinite(start) and math.isfinite(end)):
            raise ConfigError(f"busy[{index}] = ({start}, {end}) is not a pair of finite times")
        if end < start:
            raise ConfigError(f"busy[{index}] ends at {end} s, before it starts at {start} s")
        low, high = max(start, 0.0), min(end, iteration_seconds)
        # A zero-length interval blocks nothing; keeping it would split a gap in two.
        if high > low:
            clipped.append((low, high))
    spans = []
    cursor = 0.0
    for start, end in sorted(clipped):
        if start - cursor > min_span_seconds:
            spans.append(IdleSpan(cursor, start - cursor))
        cursor = max(cursor, end)
    if iteration_seconds - cursor > min_span_seconds:
        spans.append(IdleSpan(cursor, iteration_seconds - cursor))
    return IdleProfile(iteration_seconds, tuple(spans))


def span_spread(profiles: Sequence[IdleProfile]) -> tuple[SpanSpread, ...]:
    """The spread of each span's length across iterations, position by position.

    Raises:
        ConfigError: no profiles, or profiles with different numbers of spans (positions cannot be
            matched).
    """
    _check_comparable(profiles)
    spread = []
    for index in range(len(profiles[0].spans)):
        lengths = [profile.spans[index].length for profile in profiles]
        mean = statistics.fmean(lengths)
        std = statistics.pstdev(lengths, mu=mean)
        spread.append(SpanSpread(index, mean, std, std / mean))
    return tuple(spread)


def mean_profile(profiles: Sequence[IdleProfile]) -> IdleProfile:
    """Average start, length and iteration time position by position (the paper's profile).

    Raises:
        ConfigError: no profiles, or profiles with different numbers of spans.
    """
    _check_comparable(profiles)
    period = statistics.fmean(profile.iteration_seconds for profile in profiles)
    spans: list[IdleSpan] = []
    for index in range(len(profiles[0].spans)):
        start = statistics.fmean(profile.spans[index].start for profile in profiles)
        end = statistics.fmean(profile.spans[index].end for profile in profiles)
        # Averages of sorted, disjoint spans stay sorted and disjoint; clamping only absorbs the
        # rounding of the sums.
        start = max(start, spans[-1].end if spans else 0.0)
        end = min(end, period)
        if end > start:
            spans.append(IdleSpan(start, end - start))
    return IdleProfile(period, tuple(spans))


def _check_comparable(profiles: Sequence[IdleProfile]) -> None:
    if not profiles:
        raise ConfigError("profiles is empty: at least one profiled iteration is needed")
    expected = len(profiles[0].spans)
    for index, profile in enumerate(profiles):
        if len(profile.spans) != expected:
            raise ConfigError(
                f"profiles[{index}] has {len(profile.spans)} idle spans, profiles[0] has "
                f"{expected}: spans are compared position by position"
            )


def merge_profiles(profiles: Sequence[IdleProfile], min_span_seconds: float = 0.0) -> IdleProfile:
    """The time idle for every one of several processes sharing one link (a machine's ranks).

    Each profile's busy time (its complement) is merged; what no process uses stays idle. The
    iteration time is the longest of them.

    Raises:
        ConfigError: no profiles.
    """
    if not profiles:
        raise ConfigError("profiles is empty: at least one process's profile is needed")
    period = max(profile.iteration_seconds for profile in profiles)
    busy: list[tuple[float, float]] = []
    for profile in profiles:
        cursor = 0.0
        for span in profile.spans:
            busy.append((cursor, span.start))
            cursor = span.end
        busy.append((cursor, period))
    return idle_spans(busy, period, min_span_seconds)


def profile_to_dict(profile: IdleProfile) -> dict[str, object]:
    """A JSON-ready form of `profile` (the inverse of `profile_from_dict`)."""
    return {
        "iteration_s": profile.iteration_seconds,
        "spans": [[span.start, span.length] for span in profile.spans],
    }


MAX_SPANS = 10_000
"""Most idle spans a profile received from a trainer may have."""


def profile_from_dict(raw: object) -> IdleProfile:
    """Read a profile a trainer sent.

    Raises:
        ConfigError: the value is not a profile (the message says what is wrong).
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"a profile must be an object, got {type(raw).__name__}")
    spans = raw.get("spans")
    if not isinstance(spans, list) or len(spans) > MAX_SPANS:
        raise ConfigError(f"profile spans must be a list of at most {MAX_SPANS} [start, length]")
    parsed = []
    for index, pair in enumerate(spans):
        if not (isinstance(pair, list) and len(pair) == 2 and all(_number(v) for v in pair)):
            raise ConfigError(f"profile spans[{index}] is not [start, length]: {pair!r}")
        parsed.append(IdleSpan(float(pair[0]), float(pair[1])))
    period = raw.get("iteration_s")
    if not _number(period):
        raise ConfigError(f"profile iteration_s must be a number, got {period!r}")
    return IdleProfile(float(period), tuple(parsed))  # type: ignore[arg-type]


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
