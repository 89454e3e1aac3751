"""Pacing checkpoint chunks into the idle windows of the iterations as they happen.

`schedule_checkpoint` plans one typical iteration: chunk sizes, which idle span carries what, and
the interval. Real iterations do not start on a fixed clock, so the pacer anchors the profile's
spans to each iteration's start as the trainers report it and grants link time chunk by chunk:

- a chunk may start only inside the usable part [start, start + mu * length] of an idle span of
  the current iteration, and only if its modelled cost alpha + s/B ends inside it; where the
  whole chunk does not fit, the largest piece that does (at least `min_bytes`) is granted, as the
  schedule fills the end of each span with a partial chunk;
- grants never overlap: the senders to the different peers share one link, and each grant
  reserves its modelled time on it;
- a chunk that finds no room left in the current iteration waits for the next iteration's start,
  so a checkpoint too big for one iteration spreads over several, as the schedule's interval says;
- a chunk whose smallest piece fits no usable window goes whole at the start of the iteration's
  last span, the schedule's overflow rule, and is counted as overflow;
- once the trainers report no iteration for `stall_s` past the expected end of the current one,
  the network carries no training traffic to avoid: chunks go at once until iterations resume.

Thread-safe; the clock is injectable for tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from gemini_ckpt.interleave.profile import IdleProfile
from gemini_ckpt.interleave.schedule import largest_fitting_chunk
from gemini_ckpt.interleave.traffic import TrafficConfig

_POLL_S = 0.05
"""Longest wait between checks of the cancellation condition."""


@dataclass
class PacerStats:
    """What the pacer granted, for status and benchmarks."""

    chunks: int = 0
    bytes: int = 0
    in_window: int = 0
    overflow: int = 0
    unpaced: int = 0
    """Granted at once: no profile yet, or training reported no iteration for a while."""
    waited_s: float = 0.0


class Grant(NamedTuple):
    """Link time for `nbytes` (all or part of what was asked for) from `at`, and why."""

    at: float
    kind: str
    nbytes: int


class LinkPacer:
    """Grants one machine's checkpoint chunks link time inside training's idle windows."""

    def __init__(
        self,
        stall_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stall_s = stall_s
        self._clock = clock
        self._cond = threading.Condition()
        self._profile: IdleProfile | None = None
        self._traffic: TrafficConfig | None = None
        self._anchor: float | None = None
        self._anchor_step = -1
        self._link_free_at = 0.0
        self.stats = PacerStats()

    @property
    def pacing(self) -> bool:
        """Whether a profile is in place (without one, every chunk is granted at once)."""
        with self._cond:
            return self._profile is not None

    def configure(self, profile: IdleProfile | None, traffic: TrafficConfig | None) -> None:
        """Pace by `profile`'s idle spans and `traffic`'s cost model (None: stop pacing)."""
        with self._cond:
            self._profile, self._traffic = profile, traffic
            self._cond.notify_all()

    def reset(self) -> None:
        """Forget the iterations seen (a new generation starts its trainers again)."""
        with self._cond:
            self._anchor, self._anchor_step = None, -1
            self._cond.notify_all()

    def iteration_started(self, step: int, at: float) -> None:
        """The iteration after `step`'s save began at `at` (monotonic seconds) on some rank.

        Ranks of one machine report the same iteration a little apart; the earliest counts.
        """
        with self._cond:
            if step > self._anchor_step:
                self._anchor, self._anchor_step = at, step
            elif step == self._anchor_step and self._anchor is not None:
                self._anchor = min(self._anchor, at)
            self._cond.notify_all()

    def acquire(
        self,
        nbytes: int,
        cancelled: Callable[[], bool] = lambda: False,
        min_bytes: int | None = None,
    ) -> int:
        """Wait until `nbytes`, or a piece of at least `min_bytes`, may go on the link.

        Returns the bytes granted (`nbytes` when `min_bytes` is None), or 0 if `cancelled()`
        first.
        """
        started = self._clock()
        with self._cond:
            while True:
                if cancelled():
                    return 0
                now = self._clock()
                grant = self.next_grant(nbytes, now, min_bytes)
                if grant is not None and grant.at <= now:
                    self._reserve(grant.nbytes, now, grant.kind)
                    self.stats.waited_s += now - started
                    return grant.nbytes
                wait = _POLL_S if grant is None else min(_POLL_S, grant.at - now)
                self._cond.wait(timeout=wait)

    def _reserve(self, nbytes: int, now: float, kind: str) -> None:
        traffic = self._traffic
        cost = traffic.cost(nbytes) if traffic is not None else 0.0
        self._link_free_at = max(now, self._link_free_at) + cost
        self.stats.chunks += 1
        self.stats.bytes += nbytes
        setattr(self.stats, kind, getattr(self.stats, kind) + 1)

    def next_grant(self, nbytes: int, now: float, min_bytes: int | None = None) -> Grant | None:
        """When `nbytes` (or a piece of at least `min_bytes`) asked for at `now` may start.

        None: not in this iteration (wait for the next one's start). Changes nothing: `acquire`
        reserves. The kind is "in_window", "overflow" (even the smallest piece fits no window:
        all of it at the last span) or "unpaced" (no profile, or training reported no iteration
        for a while); only "in_window" grants a piece.
        """
        profile, traffic, anchor = self._profile, self._traffic, self._anchor
        if profile is None or traffic is None:
            return Grant(now, "unpaced", nbytes)
        if anchor is None:
            return None  # no iteration reported yet in this generation
        earliest = max(now, self._link_free_at)
        if earliest > anchor + profile.iteration_seconds + self._stall_s:
            return Grant(earliest, "unpaced", nbytes)
        smallest = nbytes if min_bytes is None else max(1, min(min_bytes, nbytes))
        windows = [
            (anchor + span.start, anchor + span.start + traffic.margin * span.length)
            for span in profile.spans
        ]
        for opens, closes in windows:
            start = max(earliest, opens)
            if start + traffic.cost(nbytes) <= closes:
                return Grant(start, "in_window", nbytes)
            fits = largest_fitting_chunk(0.0, closes - start, traffic, limit=nbytes)
            if fits >= smallest:
                return Grant(start, "in_window", fits)
        longest = max((closes - opens for opens, closes in windows), default=0.0)
        if windows and traffic.cost(smallest) > longest:
            opens, closes = windows[-1]
            if earliest <= max(closes, opens):
                return Grant(max(earliest, opens), "overflow", nbytes)
        return None
