"""The restore decision: the step the whole job resumes from, and where each rank's state is.

A pure function of the agents' inventories. All ranks resume from the same step: the newest one that
every rank holds. Never some ranks at S and others at S-1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LOCAL_MEMORY = "local memory"
FRESH_START = "none (fresh start)"


@dataclass(frozen=True)
class RestorePlan:
    """The decision for one generation; `step` is None for a fresh start."""

    generation: int
    step: int | None
    sources: dict[int, str]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as published to the job store."""
        return {
            "generation": self.generation,
            "step": self.step,
            "sources": {str(r): s for r, s in self.sources.items()},
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RestorePlan:
        """Inverse of `to_dict`."""
        step = raw.get("step")
        return cls(
            int(raw["generation"]),
            None if step is None else int(step),
            {int(r): str(s) for r, s in dict(raw["sources"]).items()},
            str(raw["reason"]),
        )


def plan_restore(
    generation: int, world_size: int, inventories: Mapping[int, Mapping[int, list[int]]]
) -> RestorePlan:
    """Choose the newest step held by every rank of `world_size`, from each machine's inventory.

    `inventories` maps machine -> rank -> committed steps held in that machine's memory.
    """
    held: dict[int, set[int]] = {rank: set() for rank in range(world_size)}
    for per_rank in inventories.values():
        for rank, steps in per_rank.items():
            if 0 <= rank < world_size:
                held[rank].update(steps)
    common = set.intersection(*held.values()) if held else set()
    newest = {rank: max(steps) for rank, steps in held.items() if steps}
    if common:
        step = max(common)
        lagging = sorted(r for r, n in newest.items() if n > step)
        detail = f"; ranks {lagging} also hold newer steps, discarded" if lagging else ""
        return RestorePlan(
            generation,
            step,
            dict.fromkeys(held, LOCAL_MEMORY),
            f"step {step} is the newest step held in local memory by all {world_size} ranks"
            + detail,
        )
    if not newest:
        return RestorePlan(
            generation,
            None,
            dict.fromkeys(held, FRESH_START),
            "no rank holds a checkpoint: fresh start from step 0",
        )
    missing = sorted(r for r in held if not held[r])
    summary = ", ".join(f"rank {r}: {sorted(held[r])}" for r in sorted(held)[:8])
    return RestorePlan(
        generation,
        None,
        dict.fromkeys(held, FRESH_START),
        f"no step is held by every rank (ranks without a checkpoint: {missing}; {summary}); "
        "with no other tier to fall back to, the job restarts from step 0",
    )
