"""The restore decision: the step the whole job resumes from, and where each rank's state is.

A pure function of what every tier holds. All ranks resume from the same step: the newest one that
every rank can restore from some tier. Never some ranks at S and others at S-1. Per rank, the
nearest tier that holds that step is used: its machine's memory, then a peer's replica (over the
network), then the persistent tier.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LOCAL_MEMORY = "local memory"
PERSISTENT_TIER = "persistent tier"
FRESH_START = "none (fresh start)"
_PEER_PREFIX = "peer machine "


def peer_source(machine: int) -> str:
    """The source name of a replica held by `machine`."""
    return f"{_PEER_PREFIX}{machine}"


def source_peer(source: str) -> int | None:
    """The machine a peer source names, or None for the other tiers."""
    if not source.startswith(_PEER_PREFIX):
        return None
    number = source.removeprefix(_PEER_PREFIX)
    return int(number) if number.isdigit() else None


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
    generation: int,
    world_size: int,
    inventories: Mapping[int, Mapping[int, list[int]]],
    persistent: Mapping[int, list[int]] | None = None,
    replicas: Mapping[int, Mapping[int, list[int]]] | None = None,
) -> RestorePlan:
    """Choose the newest step every rank of `world_size` can restore, and each rank's source.

    `inventories` maps machine -> rank -> committed steps in that machine's memory (its own
    ranks); `replicas` maps machine -> rank -> complete replicas it holds of other machines'
    ranks; `persistent` maps rank -> steps with a complete copy in the persistent tier. A rank
    prefers its machine's memory, then a peer's replica, then the persistent tier; among peers
    holding the step, the one serving the fewest ranks so far (then the lowest-numbered).
    """
    memory: dict[int, set[int]] = {rank: set() for rank in range(world_size)}
    for per_rank in inventories.values():
        for rank, steps in per_rank.items():
            if 0 <= rank < world_size:
                memory[rank].update(steps)
    holders: dict[tuple[int, int], list[int]] = {}
    for machine, per_rank in sorted((replicas or {}).items()):
        for rank, steps in per_rank.items():
            for step in steps:
                holders.setdefault((rank, step), []).append(machine)
    peers = {rank: {s for r, s in holders if r == rank} for rank in memory}
    tiers = [(LOCAL_MEMORY, memory), (_PEER_PREFIX, peers)]
    if persistent is not None:
        tiers.append((PERSISTENT_TIER, {r: set(persistent.get(r, ())) for r in range(world_size)}))
    reachable = {rank: set().union(*(held[rank] for _, held in tiers)) for rank in memory}
    common = set.intersection(*reachable.values()) if reachable else set()
    if common:
        step = max(common)
        sources = {
            rank: next(name for name, held in tiers if step in held[rank]) for rank in memory
        }
        _assign_peers(sources, step, holders)
        return RestorePlan(generation, step, sources, _explain(step, sources, memory))
    newest = {rank: max(steps) for rank, steps in reachable.items() if steps}
    if not newest:
        return RestorePlan(
            generation,
            None,
            dict.fromkeys(memory, FRESH_START),
            "no rank holds a checkpoint: fresh start from step 0",
        )
    missing = sorted(r for r in reachable if not reachable[r])
    summary = ", ".join(f"rank {r}: {sorted(reachable[r])}" for r in sorted(reachable)[:8])
    return RestorePlan(
        generation,
        None,
        dict.fromkeys(memory, FRESH_START),
        f"no step is held by every rank (ranks without a checkpoint: {missing}; {summary}); "
        "the job restarts from step 0",
    )


def _assign_peers(
    sources: dict[int, str], step: int, holders: Mapping[tuple[int, int], list[int]]
) -> None:
    """Name the peer each peer-sourced rank fetches from, spreading ranks over the holders."""
    load: dict[int, int] = {}
    for rank in sorted(r for r, source in sources.items() if source == _PEER_PREFIX):
        machine = min(holders[(rank, step)], key=lambda m: (load.get(m, 0), m))
        load[machine] = load.get(machine, 0) + 1
        sources[rank] = peer_source(machine)


def _explain(step: int, sources: dict[int, str], memory: dict[int, set[int]]) -> str:
    world = len(sources)
    by_source: dict[str, list[int]] = {}
    for rank, source in sorted(sources.items()):
        by_source.setdefault(source, []).append(rank)
    if list(by_source) == [LOCAL_MEMORY]:
        reason = f"step {step} is the newest step held in local memory by all {world} ranks"
    else:
        parts = "; ".join(f"{_ranks(ranks)} from {source}" for source, ranks in by_source.items())
        reason = (
            f"step {step} is the newest step every one of the {world} ranks can restore: {parts}"
        )
    newer = sorted(r for r, steps in memory.items() if steps and max(steps) > step)
    if newer:
        reason += f"; ranks {newer} also hold newer steps, discarded"
    return reason


def _ranks(ranks: list[int]) -> str:
    if len(ranks) > 1 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"
