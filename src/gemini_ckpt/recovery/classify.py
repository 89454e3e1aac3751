"""Failure classification: what kind of incident the job is in, decided from what agents report.

A pure function of the membership and progress records plus the current time. Kinds, in order of
precedence (a lost machine also kills trainers elsewhere, which must not hide it):

* machine failure: an agent's membership lease expired, so its memory is gone with it;
* software failure: a trainer died while its agent lives (its memory is intact);
* hang: every agent lives and no trainer died, but no step has completed within the deadline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum


class IncidentKind(str, Enum):
    """What went wrong."""

    MACHINE = "machine failure"
    SOFTWARE = "software failure"
    HANG = "hang"


@dataclass(frozen=True)
class MemberReport:
    """What one machine's agent last published."""

    alive: bool
    """Its membership lease is held."""
    failed_ranks: Sequence[int] = ()
    """Trainers that died in the current generation."""
    last_step: int | None = None
    last_step_at: float | None = None
    """When the machine last completed a step (seconds, the same clock as `now`)."""


@dataclass(frozen=True)
class Incident:
    """The decision: what happened, to which machines and ranks, and why we think so."""

    kind: IncidentKind
    machines: tuple[int, ...]
    ranks: tuple[int, ...] = ()
    reason: str = ""
    replace: tuple[int, ...] = field(default=())
    """Machines to replace (only for machine failures)."""


def classify(
    now: float,
    members: Mapping[int, MemberReport],
    hang_deadline_s: float,
    generation_started_at: float,
    startup_deadline_s: float | None = None,
) -> Incident | None:
    """Classify the job's state; None when nothing is wrong.

    Until a machine completes its first step of the generation, it is measured against
    `startup_deadline_s` (default: the hang deadline) from `generation_started_at`: its trainers
    are starting Python, importing torch and restoring, which on a busy host takes far longer
    than a step.
    """
    lost = sorted(m for m, report in members.items() if not report.alive)
    if lost:
        return Incident(
            IncidentKind.MACHINE,
            tuple(lost),
            reason=f"membership lease of machine(s) {lost} expired: their agents and "
            "memory are gone; replace them",
            replace=tuple(lost),
        )
    failed = {m: tuple(r.failed_ranks) for m, r in members.items() if r.failed_ranks}
    if failed:
        ranks = tuple(sorted(rank for group in failed.values() for rank in group))
        return Incident(
            IncidentKind.SOFTWARE,
            tuple(sorted(failed)),
            ranks,
            reason=f"trainer(s) {list(ranks)} died on machine(s) {sorted(failed)} whose "
            "agents live: restart the workers, memory is intact",
        )
    startup = hang_deadline_s if startup_deadline_s is None else startup_deadline_s
    return _hang(now, members, (hang_deadline_s, startup), generation_started_at)


def _hang(
    now: float,
    members: Mapping[int, MemberReport],
    deadlines_s: tuple[float, float],
    started_at: float,
) -> Incident | None:
    stalled = []
    for machine, report in sorted(members.items()):
        at = report.last_step_at
        if at is not None and at >= started_at:
            since, deadline, what = at, deadlines_s[0], f"step {report.last_step}"
        else:
            since, deadline, what = started_at, deadlines_s[1], "the generation's start"
        if now - since > deadline:
            idle = f"{now - since:.1f} s since {what} (deadline {deadline:.0f} s)"
            stalled.append((machine, idle))
    if not stalled:
        return None
    detail = ", ".join(f"machine {m}: {text}" for m, text in stalled)
    return Incident(
        IncidentKind.HANG,
        tuple(m for m, _ in stalled),
        reason=f"no step completed in time ({detail}): "
        "kill the workers and restart them from memory",
    )
