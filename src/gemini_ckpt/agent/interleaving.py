"""This machine's checkpoint traffic, fitted into the idle time of its training network.

The trainers profile their collectives and send the idle spans of a typical iteration (`profile`
requests); once every local rank has, their spans are intersected (the ranks share the machine's
link), the checkpoint is scheduled into them (`schedule_checkpoint`: chunk size, interval and why)
and the pacer that the senders to all peers share is set to that profile. Each save's `begin`
(and again its commit) carries the start of the trainer's next iteration, which anchors the
pacer's windows: the begin comes before the copy, so a copy deferred into an idle span does not
leave the pacer without the iteration's early windows.

Until the first profile is in, nothing is sent: as in the paper, the profiled iterations run
without checkpoint traffic, so the traffic cannot distort the profile it is scheduled by. A new
profile (the iteration time drifted) replaces the old one while sending goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from gemini_ckpt.errors import ConfigError, ProtocolError
from gemini_ckpt.interleave import Schedule, latest_start, schedule_checkpoint
from gemini_ckpt.interleave.pacer import LinkPacer
from gemini_ckpt.interleave.profile import (
    MAX_SPANS,
    IdleProfile,
    merge_profiles,
    profile_from_dict,
    profile_to_dict,
)
from gemini_ckpt.interleave.settings import InterleaveSettings
from gemini_ckpt.observability import events
from gemini_ckpt.observability.events import EventLog
from gemini_ckpt.protocol.messages import Request
from gemini_ckpt.replication import Pacing

log = logging.getLogger(__name__)


class TrafficShaper:
    """Profiles in, schedule and pacing out; one per agent, reset at every generation."""

    def __init__(
        self,
        settings: InterleaveSettings | None,
        ranks: range,
        remote_replicas: int,
        shard_bytes: Callable[[], int],
        event_log: EventLog,
    ) -> None:
        self.settings = settings
        self._ranks = ranks
        self._remote = remote_replicas
        self._shard_bytes = shard_bytes
        self._events = event_log
        self._lock = threading.Lock()
        self._profiles: dict[int, IdleProfile] = {}
        self._spread: dict[int, list[float]] = {}
        self._generation = -1
        self._schedule: Schedule | None = None
        self._copy_by: float | None = None
        self.pacer = LinkPacer()

    @property
    def enabled(self) -> bool:
        """Whether replication waits for idle network time (else it goes as soon as committed)."""
        return self.settings is not None and self._remote > 0

    def enter(self, generation: int) -> None:
        """A new generation's trainers profile again from scratch."""
        with self._lock:
            self._generation = generation
            self._profiles.clear()
            self._spread.clear()
            self._schedule = None
            self._copy_by = None
        self.pacer.configure(None, None)
        self.pacer.reset()

    def ready(self) -> bool:
        """Whether the senders may send (interleaving off, or a profile is in place)."""
        if not self.enabled:
            return True
        with self._lock:
            return self._schedule is not None

    def pacing(self, cancelled: Callable[[], bool]) -> Pacing | None:
        """How a push paces its chunks, or None when interleaving is off."""
        settings = self.settings
        if settings is None or not self.enabled:
            return None
        return Pacing(self.pacer, settings.chunk_bytes, settings.sub_buffers, cancelled)

    def copy_by(self) -> float | None:
        """Seconds into an iteration by which a trainer's deferred local copy must be done.

        A push cannot start before its commit: a copy held back into a later idle span must
        still leave the push the windows it needs (`latest_start`), or the push spills into the
        next iteration and a checkpoint is skipped. None until scheduled (then: no deferral).
        """
        with self._lock:
            return self._copy_by

    def iteration_started(self, _rank: int, step: int, timing: dict[str, Any]) -> None:
        """A save began or committed: its timing says when the trainer's next iteration started."""
        started = timing.get("iteration_start")
        if self.enabled and started:
            self.pacer.iteration_started(step, float(started))

    def profile_request(self, request: Request) -> dict[str, Any]:
        """A trainer's `profile`: its idle spans; the schedule once every local rank sent one.

        Raises:
            ProtocolError: the profile cannot be read.
        """
        if not self.enabled:
            return {"used": False}
        try:
            profile = profile_from_dict(request["profile"])
        except ConfigError as e:
            raise ProtocolError(f"profile of rank {request['rank']}: {e}") from e
        spread = request["profile"].get("spread")
        with self._lock:
            self._profiles[request["rank"]] = profile
            self._spread[request["rank"]] = _floats(spread)
            complete = set(self._profiles) == set(self._ranks)
            profiles = list(self._profiles.values())
            generation = self._generation
        if complete and self.settings is not None:
            self._reschedule(self.settings, profiles, generation)
        return {"used": True}

    def _reschedule(
        self, settings: InterleaveSettings, profiles: list[IdleProfile], generation: int
    ) -> None:
        merged = merge_profiles(profiles, settings.min_span_s)
        traffic = settings.traffic(max(1, self._shard_bytes()), self._remote)
        if not merged.spans:
            log.warning(
                "the training network is never idle for more than %.3f s: checkpoint traffic "
                "cannot be interleaved and is sent as soon as each checkpoint is committed",
                settings.min_span_s,
            )
            schedule = None
        else:
            schedule = schedule_checkpoint(merged, traffic)
        with self._lock:
            if generation != self._generation:
                return
            # No idle span: an empty schedule still opens the gate (sending unpaced).
            self._schedule = schedule or _UNPACED
            fits = schedule is not None and schedule.interval_iterations == 1
            self._copy_by = latest_start(merged, traffic) if fits else None
        self.pacer.configure(merged if schedule else None, traffic if schedule else None)
        self._events.emit(
            events.INTERLEAVE_SCHEDULE,
            generation=generation,
            **profile_to_dict(merged),
            idle_s=merged.idle_seconds,
            spread={str(rank): values for rank, values in sorted(self._spread.items())},
            shard_bytes=traffic.shard_bytes,
            interval=schedule.interval_iterations if schedule else None,
            checkpoint_s=schedule.checkpoint_seconds if schedule else None,
            copy_by_s=self.copy_by(),
            transfer_s=schedule.transfer_seconds if schedule else None,
            reason=schedule.reason if schedule else "no idle span: unpaced",
        )
        if schedule is not None:
            log.info("interleaving: %s", schedule.reason)

    def status(self) -> dict[str, Any]:
        """Whether pacing is on, the schedule's interval, and what the pacer granted."""
        if not self.enabled:
            return {}
        with self._lock:
            schedule = self._schedule
        stats = self.pacer.stats
        return {
            "interleave": {
                "profiled": schedule is not None,
                "interval": schedule.interval_iterations if schedule else None,
                "chunks": stats.chunks,
                "in_window": stats.in_window,
                "overflow": stats.overflow,
                "unpaced": stats.unpaced,
            }
        }


def _floats(raw: Any) -> list[float]:
    """The per-span spread a trainer reported (reported only: malformed means none)."""
    if not isinstance(raw, list) or len(raw) > MAX_SPANS:
        return []
    return [round(float(v), 4) for v in raw if isinstance(v, (int, float))]


_UNPACED = Schedule((), 0, 0.0, 0.0, 0.0, 1, "no idle span: unpaced")
