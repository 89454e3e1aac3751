"""Placement strategies: pure functions of (machines, replicas[, failure domains]).

- **group**: disjoint groups of m consecutive machines; every member holds the checkpoints of the
  whole group. Needs m | N. Optimal for k = m simultaneous failures (Theorem 1 of the paper).
- **mixed** (the paper's Algorithm 1): floor(N/m) - 1 groups of m, then a last group of
  m + (N mod m) members with ring placement inside it. Equal to group placement when m | N.
- **ring** (baseline): machine i's checkpoint lives on i, i+1, ..., i+m-1 (mod N).

Machines are numbered 0..N-1. With failure-domain labels, the same shapes are laid over an ordering
of the machines that keeps members of one group in distinct domains where the counts allow it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from gemini_ckpt.errors import PlacementError
from gemini_ckpt.placement.layout import Placement

STRATEGIES = ("mixed", "group", "ring")


def group_placement(machines: int, replicas: int) -> Placement:
    """Disjoint groups of `replicas` machines, each member holding the whole group's checkpoints.

    Raises:
        PlacementError: `replicas` does not divide `machines`, or the sizes are invalid.
    """
    _check_sizes(machines, replicas)
    if machines % replicas:
        raise PlacementError(
            f"group placement needs m | N, got N={machines}, m={replicas}; use mixed placement"
        )
    return _lay_out(list(range(machines)), replicas, "mixed")


def mixed_placement(machines: int, replicas: int) -> Placement:
    """The paper's Algorithm 1: groups of m plus a ring of m + (N mod m) machines at the end.

    The result has kind `group` when m | N (including m = 1) and `mixed` otherwise.

    Raises:
        PlacementError: `replicas` < 1, or more replicas than machines.
    """
    _check_sizes(machines, replicas)
    return _lay_out(list(range(machines)), replicas, "mixed")


def ring_placement(machines: int, replicas: int) -> Placement:
    """Ring placement over all machines: i's checkpoint on i, i+1, ..., i+m-1 (mod N).

    Raises:
        PlacementError: `replicas` < 1, or more replicas than machines.
    """
    _check_sizes(machines, replicas)
    return _lay_out(list(range(machines)), replicas, "ring")


def place(
    machines: int,
    replicas: int,
    strategy: str = "mixed",
    domains: Sequence[str] | None = None,
) -> tuple[Placement, str]:
    """Choose a placement and say why: the policy entry point used by the simulator and the CLI.

    Args:
        machines: N, the number of machines.
        replicas: m, copies of each checkpoint including the machine's own.
        strategy: `mixed` (the default; group placement when m | N), `group` or `ring`.
        domains: Optional failure-domain label per machine (rack, switch, power feed). When given,
            members of one group are spread over distinct domains where possible.

    Returns:
        The placement and a one-line reason describing its shape and any domain conflicts.

    Raises:
        PlacementError: invalid sizes, an unknown strategy, `group` with m not dividing N, or a
            `domains` list whose length is not N.
    """
    if strategy not in STRATEGIES:
        raise PlacementError(f"placement strategy {strategy!r} is not one of {STRATEGIES}")
    _check_sizes(machines, replicas)
    if strategy == "group" and machines % replicas:
        raise PlacementError(
            f"group placement needs m | N, got N={machines}, m={replicas}; use mixed placement"
        )
    layout = "ring" if strategy == "ring" else "mixed"
    if domains is None:
        placement = _lay_out(list(range(machines)), replicas, layout)
        return placement, describe(placement)
    if len(domains) != machines:
        raise PlacementError(f"{len(domains)} domain labels for {machines} machines")
    order = _spread_order(domains, replicas, layout)
    placement = _lay_out(order, replicas, layout)
    conflicts = domain_conflicts(placement, domains)
    spread = len(set(domains))
    if conflicts:
        detail = (
            f"{len(conflicts)} machine(s) share a domain with one of their holders "
            f"(first: machine {conflicts[0]}); {spread} domain(s) cannot separate every group"
        )
    else:
        detail = f"every holder set spans {replicas} distinct domains out of {spread}"
    return placement, f"{describe(placement)}; failure domains: {detail}"


def describe(placement: Placement) -> str:
    """A one-line human description of a placement's shape."""
    n, m = placement.machines, placement.replicas
    sizes = Counter(len(group) for group in placement.groups)
    if placement.kind == "ring":
        shape = f"one ring of {n}"
    else:
        shape = ", ".join(
            f"{count} group{'s' if count > 1 else ''} of {size}"
            + (" (ring inside)" if size > m else "")
            for size, count in sorted(sizes.items())
        )
    sends = "no copies" if m == 1 else f"{m - 1} cop{'y' if m == 2 else 'ies'}"
    return f"{placement.kind} placement of N={n}, m={m}: {shape}; each machine sends {sends}"


def domain_conflicts(placement: Placement, domains: Sequence[str]) -> tuple[int, ...]:
    """Machines whose holder set contains two machines of the same failure domain.

    Raises:
        PlacementError: `domains` does not have one label per machine.
    """
    if len(domains) != placement.machines:
        raise PlacementError(f"{len(domains)} domain labels for {placement.machines} machines")
    return tuple(
        owner
        for owner, held_by in enumerate(placement.holders)
        if len({domains[h] for h in held_by}) < len(held_by)
    )


def _check_sizes(machines: int, replicas: int) -> None:
    if machines < 1:
        raise PlacementError(f"a placement needs at least one machine, got N={machines}")
    if replicas < 1:
        raise PlacementError(f"replicas must be >= 1 (the machine's own copy), got m={replicas}")
    if replicas > machines:
        raise PlacementError(
            f"m={replicas} replicas need at least {replicas} machines, got N={machines}"
        )


def _group_sizes(machines: int, replicas: int, layout: str) -> list[int]:
    """Sizes of consecutive blocks of the ordering: all N for a ring, else Algorithm 1's groups."""
    if layout == "ring":
        return [machines]
    sizes = [replicas] * (machines // replicas)
    sizes[-1] += machines % replicas
    return sizes


def _lay_out(order: list[int], replicas: int, layout: str) -> Placement:
    """Build the holder sets of `order[j]` from the block shape over positions j."""
    n = len(order)
    holders: list[tuple[int, ...]] = [()] * n
    start = 0
    for size in _group_sizes(n, replicas, layout):
        members = order[start : start + size]
        for j, owner in enumerate(members):
            holders[owner] = tuple(members[(j + step) % size] for step in range(replicas))
        start += size
    kind = "ring" if layout == "ring" else ("group" if n % replicas == 0 else "mixed")
    return Placement(kind=kind, holders=tuple(holders))


def _spread_order(domains: Sequence[str], replicas: int, layout: str) -> list[int]:
    """An ordering of machines whose consecutive windows avoid repeating a domain.

    Greedy: fill the blocks of the layout position by position, each time taking a machine from the
    domain with the most machines left among those not yet used by the last m-1 positions of the
    current block (any domain when none qualifies). Ties go to the smaller label, then machine id.
    """
    pools: dict[str, list[int]] = {}
    for machine, label in enumerate(domains):
        pools.setdefault(label, []).append(machine)
    order: list[int] = []
    for size in _group_sizes(len(domains), replicas, layout):
        block: list[int] = []
        for _ in range(size):
            recent = {domains[m] for m in block[-(replicas - 1) :]} if replicas > 1 else set()
            candidates = [d for d, left in pools.items() if left and d not in recent]
            if not candidates:
                candidates = [d for d, left in pools.items() if left]
            label = min(candidates, key=lambda d: (-len(pools[d]), d))
            block.append(pools[label].pop(0))
        order.extend(block)
    return order
