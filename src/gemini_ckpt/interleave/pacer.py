"""Pacing checkpoint chunks into the idle windows of the iterations as they happen.

`schedule_checkpoint` plans one typical iteration: chunk sizes, which idle span carries what, and
the interval. Real iterations do not start on a fixed clock, so the pacer anchors the profile's
spans to each iteration's start as the trainers report it and grants link time chunk by chunk:

- a chunk may start only inside the usable part [start, start + mu * length] of an idle span of
  the current iteration, and only if its modelled cost alpha + s/B ends inside it;
- grants never overlap: the senders to the different peers share one link, and each grant
  reserves its modelled time on it;
- a chunk that finds no room left in the current iteration waits for the next iteration's start,
  so a checkpoint too big for one iteration spreads over several, as the schedule's interval says;
- a chunk larger than any usable window (R/p too big for the profile) goes at the start of the
  iteration's last span, the schedule's overflow rule, and is counted as overflow;
- once the trainers report no iteration for `stall_s` past the expected end of the current one,
  the network carries no training traffic to avoid: chunks go at once until iterations resume.

Thread-safe; the clock is injectable for tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gemini_ckpt.interleave.profile import IdleProfile
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

    def acquire(self, nbytes: int, cancelled: Callable[[], bool] = lambda: False) -> bool:
        """Wait until a chunk of `nbytes` may go on the link; False if `cancelled()` first."""
        started = self._clock()
        with self._cond:
            while True:
                if cancelled():
                    return False
                now = self._clock()
                grant = self._grant_time(nbytes, now)
                if grant is not None and grant[0] <= now:
                    self._reserve(nbytes, now, grant[1])
                    self.stats.waited_s += now - started
                    return True
                wait = _POLL_S if grant is None else min(_POLL_S, grant[0] - now)
                self._cond.wait(timeout=wait)

    def _reserve(self, nbytes: int, now: float, kind: str) -> None:
        traffic = self._traffic
        cost = traffic.cost(nbytes) if traffic is not None else 0.0
        self._link_free_at = max(now, self._link_free_at) + cost
        self.stats.chunks += 1
        self.stats.bytes += nbytes
        setattr(self.stats, kind, getattr(self.stats, kind) + 1)

    def _grant_time(self, nbytes: int, now: float) -> tuple[float, str] | None:
        """When the chunk may start (<= now: at once) and why, or None: not in this iteration."""
        profile, traffic, anchor = self._profile, self._traffic, self._anchor
        if profile is None or traffic is None:
            return now, "unpaced"
        if anchor is None:
            return None  # no iteration reported yet in this generation
        earliest = max(now, self._link_free_at)
        if earliest > anchor + profile.iteration_seconds + self._stall_s:
            return earliest, "unpaced"
        cost = traffic.cost(nbytes)
        windows = [
            (anchor + span.start, anchor + span.start + traffic.margin * span.length)
            for span in profile.spans
        ]
        for opens, closes in windows:
            start = max(earliest, opens)
            if start + cost <= closes:
                return start, "in_window"
        longest = max((closes - opens for opens, closes in windows), default=0.0)
        if windows and cost > longest:
            opens, closes = windows[-1]
            if earliest <= max(closes, opens):
                return max(earliest, opens), "overflow"
        return None
