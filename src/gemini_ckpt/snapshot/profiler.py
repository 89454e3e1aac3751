"""When this trainer's collectives use the network, iteration by iteration: the idle-span profile.

The agent sends checkpoint traffic only while training leaves the network idle, so it must know
when that is. The profiler timestamps every collective this process issues, without any change to
the training code:

- `torch.distributed`'s collective functions are wrapped (what FSDP2 and ZeRO-style code call:
  `all_gather_into_tensor`, `reduce_scatter_tensor`, `all_reduce`, ...). A call's busy interval
  runs from its start to its completion: the return of a blocking call, the completion of an
  asynchronous call's future (recorded by a callback), or, for a handle without a future (gloo's
  reduce-scatter), the return of the caller's `wait()`;
- a `DistributedDataParallel` model gets DDP's own Python all-reduce hook, which reaches the
  network through the wrapped `all_reduce`, so its gradient buckets are timed as they are reduced.

Functional collectives (`torch.distributed._functional_collectives`, used by DTensor
redistribution) are not seen. Iterations are delimited by `save()`: each starts when the previous
`save()` returns. After a warm-up, the next iterations are turned into idle spans; the profile is
sent to the agent. Then the iteration time is watched, and a drift beyond `drift` starts a new
profile. All times are `time.monotonic()`, the clock the agent reads too.
"""

from __future__ import annotations

import functools
import logging
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import Work

from gemini_ckpt.interleave.profile import (
    IdleProfile,
    idle_spans,
    mean_profile,
    profile_to_dict,
    span_spread,
)

log = logging.getLogger(__name__)

COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_coalesced",
    "all_gather_into_tensor",
    "all_gather_single",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "_reduce_scatter_base",
    "broadcast",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "barrier",
    "send",
    "recv",
    "isend",
    "irecv",
)
"""The `torch.distributed` functions whose calls are timed."""

_WATCH_WINDOW = 5
"""Iterations whose median time is compared with the profile's to detect drift."""


class CollectiveTimeline:
    """Busy intervals of the collectives this process issued since the last `drain()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: list[tuple[float, float]] = []
        self.recording = False

    def record(self, start: float, end: float) -> None:
        """Note that a collective held the network from `start` to `end`."""
        if self.recording:
            with self._lock:
                self._busy.append((start, end))

    def drain(self) -> list[tuple[float, float]]:
        """The intervals recorded since the last call."""
        with self._lock:
            busy, self._busy = self._busy, []
        return busy


_TIMELINE = CollectiveTimeline()
_INSTALL_LOCK = threading.Lock()


def install_collective_hooks() -> CollectiveTimeline:
    """Wrap `torch.distributed`'s collectives so their calls are timed; idempotent.

    The wrappers are marked, so a second call wraps nothing again; the process has one timeline.
    """
    with _INSTALL_LOCK:
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None and not hasattr(original, "__gemini_timed__"):
                setattr(dist, name, _timed(original, _TIMELINE))
        _rebind_deepspeed()
    return _TIMELINE


def _rebind_deepspeed() -> None:
    """Point DeepSpeed's own references to the gather and scatter functions at the timed ones.

    Its torch backend took them when it started, before any checkpointer. Nothing is imported: a
    process without DeepSpeed has no such module.
    """
    comm = sys.modules.get("deepspeed.comm.comm")
    backend = getattr(comm, "cdb", None)
    for attribute, name in (
        ("all_gather_function", "all_gather_into_tensor"),
        ("reduce_scatter_function", "reduce_scatter_tensor"),
    ):
        if getattr(backend, attribute, None) is not None:
            setattr(backend, attribute, getattr(dist, name))


def _timed(original: Callable[..., Any], timeline: CollectiveTimeline) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not timeline.recording:
            return original(*args, **kwargs)
        start = time.monotonic()
        result = original(*args, **kwargs)
        if not isinstance(result, Work):  # a blocking call: done on return
            timeline.record(start, time.monotonic())
            return result
        future = _future_of(result)
        if future is not None:
            future.add_done_callback(lambda _f: timeline.record(start, time.monotonic()))
            return result
        # gloo's reduce-scatter has no future: its end is seen when the caller waits for it.
        return _TimedWork(result, lambda: timeline.record(start, time.monotonic()))

    wrapper.__gemini_timed__ = True  # type: ignore[attr-defined]
    return wrapper


def _future_of(work: Work) -> Any:
    """The completion future of an asynchronous call's work handle, if its backend has one."""
    try:
        return work.get_future()
    except RuntimeError:  # "Work::getFuture not implemented"
        return None


class _TimedWork(Work):
    """A work handle that notes when its collective ended: at the first `wait()` that returns.

    A `Work` itself, so code that tells asynchronous calls by `isinstance(work, Work)` (FSDP2
    does) still waits for it; every query goes to the real handle.
    """

    def __init__(self, inner: Work, done: Callable[[], None]) -> None:
        super().__init__()
        self._inner = inner
        self._done: Callable[[], None] | None = done

    def wait(self, timeout: Any = None) -> bool:
        ended = self._inner.wait() if timeout is None else self._inner.wait(timeout)
        if self._done is not None:
            done, self._done = self._done, None
            done()
        return bool(ended)

    def is_completed(self) -> bool:
        return bool(self._inner.is_completed())

    def is_success(self) -> bool:
        return bool(self._inner.is_success())

    def exception(self) -> Any:
        return self._inner.exception()

    def result(self) -> Any:
        return self._inner.result()

    def source_rank(self) -> int:
        return int(self._inner.source_rank())

    def synchronize(self) -> None:
        self._inner.synchronize()

    def get_future(self) -> Any:
        return self._inner.get_future()


def hook_ddp(model: torch.nn.Module | None) -> bool:
    """Route a DDP model's gradient all-reduce through the timed `all_reduce`; False if not DDP.

    DDP accepts one communication hook per model: a model that registered its own keeps it (and
    its buckets are timed only if that hook calls `torch.distributed` collectives).
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return False
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    try:
        model.register_comm_hook(None, allreduce_hook)
    except RuntimeError as e:
        log.warning("DDP's gradient buckets are not profiled: %s", e)
        return False
    return True


@dataclass(frozen=True)
class ProfileReport:
    """One finished profile: the mean idle spans and how stable they were."""

    profile: IdleProfile
    iterations: int
    spread: tuple[float, ...]
    """Per span, the normalised standard deviation of its length (the paper: under 10 %)."""

    @property
    def max_spread(self) -> float:
        """The largest of `spread` (0 without spans)."""
        return max(self.spread, default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """The `profile` request's field."""
        return {
            **profile_to_dict(self.profile),
            "iterations": self.iterations,
            "max_spread": self.max_spread,
            "spread": list(self.spread),
        }


class IterationProfiler:
    """Turns the timeline of each iteration into idle spans; `mark()` at each iteration start."""

    def __init__(
        self,
        timeline: CollectiveTimeline,
        iterations: int,
        warmup: int = 2,
        min_span_s: float = 0.005,
        drift: float = 0.2,
    ) -> None:
        self._timeline = timeline
        self._iterations = iterations
        self._warmup = warmup
        self._min_span_s = min_span_s
        self._drift = drift
        self._started: float | None = None
        self._skip = warmup
        self._profiles: list[IdleProfile] = []
        self._recent: list[float] = []
        self._period: float | None = None
        self.reports = 0
        timeline.recording = True

    def mark(self, now: float) -> ProfileReport | None:
        """The current iteration ended and the next began at `now`; a new profile when ready."""
        started, self._started = self._started, now
        busy = self._timeline.drain()
        if started is None:
            return None
        if self._period is not None:
            self._watch(now - started)
            return None
        if self._skip > 0:
            self._skip -= 1
            return None
        relative = [(s - started, e - started) for s, e in busy]
        self._profiles.append(idle_spans(relative, now - started, self._min_span_s))
        if len(self._profiles) < self._iterations:
            return None
        return self._finish()

    def _finish(self) -> ProfileReport:
        # Iterations with an odd number of gaps (a collective split or merged by timing) cannot
        # be compared position by position; the most common shape is the iteration's shape.
        shape, _count = Counter(len(p.spans) for p in self._profiles).most_common(1)[0]
        alike = [p for p in self._profiles if len(p.spans) == shape]
        spread = span_spread(alike)
        report = ProfileReport(
            mean_profile(alike), len(alike), tuple(s.normalised_std for s in spread)
        )
        self._profiles = []
        self._period = report.profile.iteration_seconds
        self._recent = []
        self._timeline.recording = False
        self.reports += 1
        log.info(
            "profiled %d iterations: T_iter %.3f s, %d idle spans, %.3f s idle, spread %.1f%%",
            report.iterations,
            report.profile.iteration_seconds,
            len(report.profile.spans),
            report.profile.idle_seconds,
            100 * report.max_spread,
        )
        return report

    def _watch(self, duration: float) -> None:
        self._recent = [*self._recent[-(_WATCH_WINDOW - 1) :], duration]
        period = self._period
        if period is None or len(self._recent) < _WATCH_WINDOW:
            return
        typical = statistics.median(self._recent)
        if self._drift > 0 and abs(typical - period) > self._drift * period:
            log.info(
                "iteration time drifted from %.3f s to %.3f s: profiling again", period, typical
            )
            # The iteration under way was not recorded from its start: skip it.
            self._period, self._skip = None, 1
            self._timeline.drain()
            self._timeline.recording = True
