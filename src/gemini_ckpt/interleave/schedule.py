"""Checkpoint traffic scheduling into network idle time: the paper's Algorithm 2, corrected.

Every chunk costs f(s) = alpha + s/B seconds on the link (the alpha-beta model). Of an idle span of
length t, only mu*t seconds may be filled: the margin mu is a *fraction* of each span, as in the
paper, which states mu in (0, 1); mu = 1 is also accepted and means "trust the profile fully". A
chunk is at most R/p bytes, one GPU sub-buffer, so receiving chunk i+1 overlaps copying chunk i to
host memory. Spans are filled in order with whole R/p chunks while they fit, then one partial chunk
of the largest whole number of bytes that still fits; what fits in no span goes to the last span as
overflow. The remote copies are sent one after the other, each from byte 0 to its end.

Defects of the printed Algorithm 2 corrected here:

1. *The loop can spin forever.* When a span has time left but too little for alpha plus one byte,
   the printed loop computes size 0 and goes round again. Here the span is closed and the next one
   begins.
2. *The wrong cost is charged.* The printed line 17 subtracts f(remain) from the span's time
   instead of f(size), the cost of the chunk actually sent. Here each chunk is charged f(size).
3. *"M/p" is meant to be R/p.* Chunks are capped at the sub-buffer size, floor(R/p) bytes.
4. *One copy too many.* The replica counter makes the printed loop partition m copies, but the
   local copy never crosses the network: exactly m-1 remote copies (`remote_replicas`) are
   scheduled.
5. *Overflow is hidden.* Setting t_d = +inf discards the last span's measured length, so the plan
   cannot tell chunks that fit from chunks that delay the optimizer update (and the artifact
   silently dropped them, leaving replicas incomplete). Here the last span keeps its length;
   chunks beyond it are kept, marked `overflow`, placed only in the last span, still at most R/p
   bytes each, and their cost is reported as `overflow_seconds`. No byte is ever dropped.
6. *Fractional bytes.* (left - alpha)*B is a real number; chunks here are whole bytes, rounded
   down and re-checked against the cost model so rounding never makes a chunk overrun its span.
7. *Chunks without addresses.* The printed parts are (span, size) only. Each chunk here carries
   its replica index and byte offset, and never straddles two replicas: the copies go to
   different peers.
8. *No rule when the checkpoint does not fit.* The paper only says the frequency can be reduced.
   Here the interval is ceil(t_ckpt / T_iter) iterations, the rule of the paper's Eq. 2
   (1/f >= max(t_ckpt, T_iter)) that its HighFreq baseline uses; `schedule_checkpoint` defines
   t_ckpt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from gemini_ckpt.errors import ConfigError
from gemini_ckpt.interleave.profile import IdleProfile
from gemini_ckpt.interleave.traffic import Chunk, Cursor, SpanPlan, TrafficConfig

# A schedule lists every chunk; spreading one checkpoint over more iterations than this is a
# configuration that cannot work (the profile barely has idle time), not a plan to print.
MAX_SPREAD_ITERATIONS = 1000


@dataclass(frozen=True)
class Schedule:
    """Where each chunk of one checkpoint's traffic goes, and the checkpoint interval.

    Attributes:
        spans: One plan per idle span of each scheduled iteration, in time order.
        overflow_bytes: Bytes that fit no span; they are the last span's `overflow` chunks.
        overflow_seconds: Their cost under the cost model: how long they hold the network past
            the last span's usable time, delaying the optimizer update.
        transfer_seconds: Cost of this schedule's chunks sent back to back (the paper's
            "checkpoint time").
        checkpoint_seconds: t_ckpt, see `schedule_checkpoint`.
        interval_iterations: Checkpoint every this many iterations, ceil(t_ckpt / T_iter): 1
            when the checkpoint fits one iteration's idle time.
        reason: One line explaining the decision.
    """

    spans: tuple[SpanPlan, ...]
    overflow_bytes: int
    overflow_seconds: float
    transfer_seconds: float
    checkpoint_seconds: float
    interval_iterations: int
    reason: str

    @property
    def chunks(self) -> tuple[Chunk, ...]:
        """Every chunk in sending order."""
        return tuple(chunk for plan in self.spans for chunk in plan.chunks)


def schedule_checkpoint(
    profile: IdleProfile, traffic: TrafficConfig, iterations: int = 1
) -> Schedule:
    """Schedule one checkpoint's remote copies into the idle spans, and choose the interval.

    t_ckpt is, as in the paper's Eq. 2 and its HighFreq baseline, the time one checkpoint takes to
    leave the machine at the bandwidth available to it. Gemini may not slow training, so the
    bandwidth available is the usable idle time: t_ckpt runs from the start of the first iteration
    until the last chunk has left when the spans of consecutive iterations are filled in turn.
    The interval is then ceil(t_ckpt / T_iter), the number of iterations that takes. (The paper's
    Fig. 8 "checkpoint time", the back-to-back transfer time, is `transfer_seconds`; it would give
    an interval of 1 whenever it is under T_iter, even when the traffic overflows the idle time.)
    If no span can carry a single byte, t_ckpt falls back to `transfer_seconds`: the traffic has
    to overlap training, and spacing checkpoints t_ckpt apart keeps the link from saturating.

    Args:
        profile: The idle spans of a typical iteration.
        traffic: Checkpoint size, copies, buffer and link.
        iterations: Spread the checkpoint over this many iterations' spans (pass the returned
            `interval_iterations` to get a schedule without overflow). The interval and t_ckpt do
            not depend on it.

    Returns:
        The schedule. Its chunks cover every byte of every remote copy exactly once, in order.

    Raises:
        ConfigError: the profile has no idle span, or `iterations` is not in
            1..MAX_SPREAD_ITERATIONS.
    """
    if not profile.spans:
        raise ConfigError("profile.spans is empty: there is no idle span to schedule into")
    if isinstance(iterations, bool) or not isinstance(iterations, int):
        raise ConfigError(f"iterations must be an int, got {iterations!r}")
    if not 1 <= iterations <= MAX_SPREAD_ITERATIONS:
        raise ConfigError(f"iterations must be in 1..{MAX_SPREAD_ITERATIONS}, got {iterations}")
    cursor = Cursor(0, 0)
    plans: list[SpanPlan] = []
    for iteration in range(iterations):
        iteration_plans, cursor = _pack_iteration(profile, traffic, cursor, iteration)
        plans.extend(iteration_plans)
    overflow = _overflow_chunks(plans[-1], traffic, cursor)
    plans[-1] = replace(plans[-1], chunks=plans[-1].chunks + overflow)
    all_chunks = [chunk for plan in plans for chunk in plan.chunks]
    transfer = math.fsum(traffic.cost(chunk.size) for chunk in all_chunks)
    interval, t_ckpt, fits_idle = _interval(profile, traffic, transfer)
    overflow_bytes = sum(chunk.size for chunk in overflow)
    overflow_seconds = math.fsum(traffic.cost(chunk.size) for chunk in overflow)
    reason = _reason(profile, traffic, len(all_chunks), (interval, t_ckpt, fits_idle))
    if overflow:
        reason += (
            f"; spread over {iterations} iteration(s), {overflow_bytes} bytes overflow the last "
            f"span and hold the network {overflow_seconds:.6g} s past its usable time"
        )
    return Schedule(
        tuple(plans), overflow_bytes, overflow_seconds, transfer, t_ckpt, interval, reason
    )


def latest_start(profile: IdleProfile, traffic: TrafficConfig) -> float:
    """The latest start of an idle span from which the rest of the iteration carries the traffic.

    Seconds from the iteration's start: the remote copies, scheduled into that span and the ones
    after it, still fit this iteration's usable idle time. A checkpoint committed by then is sent
    within the iteration; one committed later spills into the next. 0.0 when the traffic needs
    the iteration from its first span on or does not fit one iteration at all.
    """
    if traffic.total_bytes == 0:
        return profile.iteration_seconds
    for first in range(len(profile.spans) - 1, -1, -1):
        rest = IdleProfile(profile.iteration_seconds, profile.spans[first:])
        _, cursor = _pack_iteration(rest, traffic, Cursor(0, 0), 0)
        if cursor.done(traffic):
            return profile.spans[first].start
    return 0.0


def largest_fitting_chunk(
    used: float, usable: float, traffic: TrafficConfig, limit: int | None = None
) -> int:
    """Bytes of the next chunk in a span that has spent `used` of its `usable` seconds.

    `limit` bytes (default: a whole sub-buffer, R/p) if they fit, else the largest whole number
    of bytes s with used + alpha + s/B <= usable, else 0.
    """
    limit = traffic.chunk_bytes if limit is None else limit
    if used + traffic.cost(limit) <= usable:
        return limit
    left = usable - used - traffic.latency_s
    if left <= 0:
        return 0
    size = min(math.floor(left * traffic.bandwidth_bytes_per_s), limit)
    # floor() of a rounded product can still be one byte too many under the cost model.
    while size > 0 and used + traffic.cost(size) > usable:
        size -= 1
    return size


def span_capacity(usable: float, traffic: TrafficConfig, limit: int) -> int:
    """Bytes a span with `usable` seconds carries when no replica ends inside it, up to `limit`."""
    used, carried = 0.0, 0
    while carried < limit:
        size = largest_fitting_chunk(used, usable, traffic)
        if size == 0:
            break
        used += traffic.cost(size)
        carried += size
    return carried


def _fill_span(plan: SpanPlan, traffic: TrafficConfig, cursor: Cursor) -> tuple[SpanPlan, Cursor]:
    chunks: list[Chunk] = []
    used = 0.0
    while not cursor.done(traffic):
        size = min(
            largest_fitting_chunk(used, plan.usable_seconds, traffic),
            traffic.shard_bytes - cursor.offset,
        )
        if size == 0:
            break  # defect 1 of the printed version: without this the loop spins
        chunks.append(Chunk(cursor.replica, cursor.offset, size, plan.span.start + used))
        used += traffic.cost(size)
        cursor = cursor.advance(size, traffic)
    filled = SpanPlan(plan.iteration, plan.index, plan.span, plan.usable_seconds, tuple(chunks))
    return filled, cursor


def _pack_iteration(
    profile: IdleProfile, traffic: TrafficConfig, cursor: Cursor, iteration: int
) -> tuple[list[SpanPlan], Cursor]:
    plans = []
    for index, span in enumerate(profile.spans):
        empty = SpanPlan(iteration, index, span, traffic.margin * span.length, ())
        plan, cursor = _fill_span(empty, traffic, cursor)
        plans.append(plan)
    return plans, cursor


def _overflow_chunks(last: SpanPlan, traffic: TrafficConfig, cursor: Cursor) -> tuple[Chunk, ...]:
    used = math.fsum(traffic.cost(chunk.size) for chunk in last.chunks)
    overflow = []
    while not cursor.done(traffic):
        size = min(traffic.chunk_bytes, traffic.shard_bytes - cursor.offset)
        overflow.append(
            Chunk(cursor.replica, cursor.offset, size, last.span.start + used, overflow=True)
        )
        used += traffic.cost(size)
        cursor = cursor.advance(size, traffic)
    return tuple(overflow)


def _interval(
    profile: IdleProfile, traffic: TrafficConfig, transfer_seconds: float
) -> tuple[int, float, bool]:
    """(interval, t_ckpt, whether idle time alone carries the checkpoint)."""
    period = profile.iteration_seconds
    if traffic.total_bytes == 0:
        return 1, 0.0, True
    usable = [traffic.margin * span.length for span in profile.spans]
    per_iteration = sum(span_capacity(u, traffic, traffic.total_bytes) for u in usable)
    if per_iteration == 0:
        return max(1, math.ceil(transfer_seconds / period)), transfer_seconds, False
    cursor, iteration = Cursor(0, 0), 0
    while True:
        remaining = traffic.shard_bytes - cursor.offset
        if remaining > per_iteration:
            # Whole iterations that end before the current replica does each carry exactly
            # `per_iteration` bytes: skip them instead of packing them chunk by chunk.
            skipped = (remaining - 1) // per_iteration
            cursor = Cursor(cursor.replica, cursor.offset + skipped * per_iteration)
            iteration += skipped
        plans, cursor = _pack_iteration(profile, traffic, cursor, iteration)
        if cursor.done(traffic):
            last = next(c for plan in reversed(plans) for c in reversed(plan.chunks))
            finish = last.send_at + traffic.cost(last.size)
            return iteration + 1, iteration * period + finish, True
        iteration += 1


def _reason(
    profile: IdleProfile,
    traffic: TrafficConfig,
    chunk_count: int,
    decision: tuple[int, float, bool],
) -> str:
    interval, t_ckpt, fits_idle = decision
    copies = f"{traffic.remote_replicas} remote cop{'y' if traffic.remote_replicas == 1 else 'ies'}"
    what = f"{traffic.total_bytes} bytes ({copies} of {traffic.shard_bytes})"
    if traffic.total_bytes == 0:
        return f"nothing to send: {what}; checkpoint every iteration"
    usable = traffic.margin * profile.idle_seconds
    room = (
        f"{len(profile.spans)} idle spans, {usable:.6g} s usable of {profile.idle_seconds:.6g} s "
        f"idle at mu={traffic.margin}, chunks of at most {traffic.chunk_bytes} bytes"
    )
    if not fits_idle:
        return (
            f"{what} cannot use the idle time ({room}): no span outlasts alpha + 1/B, so all "
            f"{chunk_count} chunks overlap training; t_ckpt = transfer time {t_ckpt:.6g} s, "
            f"checkpoint every ceil(t_ckpt / T_iter) = {interval} iteration(s)"
        )
    if interval == 1:
        return (
            f"{what} fit one iteration's idle time ({room}): {chunk_count} chunks, done "
            f"{t_ckpt:.6g} s into the iteration; checkpoint every iteration"
        )
    return (
        f"{what} exceed one iteration's idle time ({room}): in idle time only they take "
        f"t_ckpt = {t_ckpt:.6g} s, so checkpoint every ceil(t_ckpt / T_iter) = {interval} "
        f"iterations (T_iter = {profile.iteration_seconds:.6g} s)"
    )
