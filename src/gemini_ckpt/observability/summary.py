"""The recovery summary of a run, computed from its events (a pure function).

For every restart: when the failure happened and was seen, which step the job resumed from, where
each rank's state came from, how many committed iterations were lost, and how long it took from the
failure to the next completed step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gemini_ckpt.observability import events as ev


@dataclass
class Recovery:
    """One failure and the recovery that followed it."""

    generation: int
    kind: str
    failures: list[str]
    failed_at: float
    detected_at: float
    highest_committed: int | None
    restored_step: int | None
    sources: dict[int, str]
    reason: str
    restore_seconds: dict[int, float] = field(default_factory=dict)
    next_step_at: float | None = None

    @property
    def iterations_lost(self) -> int | None:
        """Committed steps thrown away (the iteration that was in progress comes on top)."""
        if self.highest_committed is None:
            return None
        return self.highest_committed - (self.restored_step or 0)

    @property
    def seconds_to_next_step(self) -> float | None:
        """From the failure to the first step completed after the restore."""
        return None if self.next_step_at is None else self.next_step_at - self.failed_at

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "generation": self.generation,
            "kind": self.kind,
            "failures": self.failures,
            "failed_at": self.failed_at,
            "detected_at": self.detected_at,
            "highest_committed_step": self.highest_committed,
            "restored_step": self.restored_step,
            "sources": {str(r): s for r, s in sorted(self.sources.items())},
            "reason": self.reason,
            "iterations_lost": self.iterations_lost,
            "seconds_to_next_step": self.seconds_to_next_step,
            "restore_seconds": {str(r): s for r, s in sorted(self.restore_seconds.items())},
        }


@dataclass
class RunSummary:
    """What happened in a run."""

    status: str
    final_step: int | None
    recoveries: list[Recovery]
    memory: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Per machine: (bytes reserved for checkpoint slots at the peak, budget)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "status": self.status,
            "final_step": self.final_step,
            "recoveries": [r.to_dict() for r in self.recoveries],
            "memory": {str(m): {"reserved": r, "budget": b} for m, (r, b) in self.memory.items()},
        }


def summarize(records: list[dict[str, Any]]) -> RunSummary:
    """Build the summary from all machines' events, merged in time order."""
    planned = sorted(
        {
            int(e["generation"])
            for e in records
            if e.get("event") == ev.PLAN and int(e.get("generation", 0)) > 0
        }
    )
    recoveries = [_recovery(records, g, ([0, *planned])[i]) for i, g in enumerate(planned)]
    progress = [e for e in records if e.get("event") == ev.PROGRESS]
    finished = [e for e in records if e.get("event") == ev.JOB_FINISHED]
    status = "running"
    if finished:
        status = "failed" if any(e.get("status") == "failed" for e in finished) else "succeeded"
    final = progress[-1]["step"] if progress else None
    memory: dict[int, tuple[int, int]] = {}
    for e in records:
        if e.get("event") == ev.MEMORY:
            machine = int(e.get("machine", 0))
            peak = max(int(e["reserved"]), memory.get(machine, (0, 0))[0])
            memory[machine] = (peak, int(e["budget"]))
    return RunSummary(status, final, recoveries, memory)


def _recovery(records: list[dict[str, Any]], generation: int, previous: int) -> Recovery:
    """The recovery into planned `generation`, from the last planned one, `previous`.

    Generations in between were opened and superseded before any plan (a dead trainer's incident
    replaced by its machine's once the machine's lease expired): they belong to this recovery.
    """
    window = range(previous, generation)
    failed = [
        e
        for e in records
        if e.get("event") in (ev.WORKER_FAILED, ev.HANG) and e.get("generation") in window
    ]
    incidents = [
        e
        for e in records
        if e.get("event") == ev.INCIDENT and previous < int(e.get("generation", 0)) <= generation
    ]
    if not failed:  # a lost machine reports nothing itself: the root's incident says what happened
        failed = [
            {"t": float(e.get("detected_at", e["t"])), "description": e.get("reason")}
            for e in incidents
        ]
    injected = [
        e
        for e in records
        if e.get("event") == ev.FAULT_INJECTED
        and float(e["t"]) <= min((float(f["t"]) for f in failed), default=float("inf"))
    ]
    detected_at = min((float(e["t"]) for e in failed), default=0.0)
    failed_at = (
        max((float(e["t"]) for e in injected), default=detected_at) if injected else detected_at
    )
    committed = [
        int(e["step"])
        for e in records
        if e.get("event") == ev.PROGRESS
        and e.get("generation") in window
        and float(e["t"]) <= detected_at
    ]
    plans = [e for e in records if e.get("event") == ev.PLAN and e.get("generation") == generation]
    sources: dict[int, str] = {}
    for plan in plans:
        sources.update({int(r): str(s) for r, s in plan.get("sources", {}).items()})
    restored = {
        int(e["rank"]): float(e["seconds"])
        for e in records
        if e.get("event") == ev.RESTORED and e.get("generation") == generation
    }
    step = plans[0].get("step") if plans else None
    later = [
        float(e["t"])
        for e in records
        if e.get("event") == ev.PROGRESS
        and e.get("generation") == generation
        and int(e["step"]) > (step or 0)
    ]
    return Recovery(
        generation=generation,
        kind=str(incidents[-1].get("kind")) if incidents else "failure",
        failures=[str(e.get("description") or e.get("reason")) for e in failed],
        failed_at=failed_at,
        detected_at=detected_at,
        highest_committed=max(committed) if committed else None,
        restored_step=step,
        sources=sources,
        reason=str(plans[0].get("reason", "")) if plans else "no plan recorded",
        restore_seconds=restored,
        next_step_at=min(later) if later else None,
    )
