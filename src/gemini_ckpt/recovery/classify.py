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
) -> Incident | None:
    """Classify the job's state; None when nothing is wrong.

    `generation_started_at` bounds the hang check, so trainers still starting up (importing torch,
    restoring) get the full deadline before their first step.
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
    return _hang(now, members, hang_deadline_s, generation_started_at)


def _hang(
    now: float, members: Mapping[int, MemberReport], deadline_s: float, started_at: float
) -> Incident | None:
    stalled = []
    for machine, report in sorted(members.items()):
        since = max(report.last_step_at or started_at, started_at)
        if now - since > deadline_s:
            stalled.append((machine, now - since, report.last_step))
    if not stalled:
        return None
    detail = ", ".join(f"machine {m}: {idle:.1f} s since step {step}" for m, idle, step in stalled)
    return Incident(
        IncidentKind.HANG,
        tuple(m for m, _, _ in stalled),
        reason=f"no step completed within the {deadline_s:.0f} s deadline ({detail}): "
        "kill the workers and restart them from memory",
    )
