"""The placement value: which machines hold a copy of each machine's checkpoint.

Machines are numbered 0..N-1. A placement with `m` replicas gives every machine a *holder set* of
exactly `m` distinct machines, the machine itself first, then its peers. Recovery from CPU memory is
possible after a set of failures iff no machine lost every member of its holder set.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from gemini_ckpt.errors import PlacementError

PLACEMENT_KINDS = ("group", "mixed", "ring", "custom")


@dataclass(frozen=True)
class Placement:
    """Who holds whose checkpoint.

    Attributes:
        kind: How the placement was built: `group` (disjoint groups of m), `mixed` (groups of m and
            a last group of m + N mod m with ring placement inside), `ring` (over all machines),
            or `custom`. With m = 1 every machine is a group of its own (kind `group`).
        holders: `holders[i]` is the tuple of machines that hold machine i's checkpoint,
            starting with i itself.
        groups: Disjoint sets of machines such that every holder set lies inside one of them (the
            connected components of the placement), in ascending order of their smallest member.
    """

    kind: str
    holders: tuple[tuple[int, ...], ...]
    groups: tuple[tuple[int, ...], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.kind not in PLACEMENT_KINDS:
            raise PlacementError(f"placement kind {self.kind!r} is not one of {PLACEMENT_KINDS}")
        _check_holders(self.holders)
        if not self.groups:
            object.__setattr__(self, "groups", _components(self.holders))
        else:
            _check_groups(self.groups, self.holders)

    @property
    def machines(self) -> int:
        """The number of machines N."""
        return len(self.holders)

    @property
    def replicas(self) -> int:
        """The number of copies m of every checkpoint, the machine's own included."""
        return len(self.holders[0])

    def holders_of(self, machine: int) -> tuple[int, ...]:
        """The machines holding `machine`'s checkpoint, the machine itself first.

        Raises:
            PlacementError: `machine` is not in 0..N-1.
        """
        return self.holders[self._check_machine(machine)]

    def peers_of(self, machine: int) -> tuple[int, ...]:
        """The machines `machine` sends its checkpoint to (its holders other than itself)."""
        return self.holders_of(machine)[1:]

    def replicas_of(self, machine: int) -> tuple[int, ...]:
        """The machines whose checkpoints `machine` stores, its own included, ascending.

        Raises:
            PlacementError: `machine` is not in 0..N-1.
        """
        self._check_machine(machine)
        return tuple(owner for owner, held_by in enumerate(self.holders) if machine in held_by)

    def group_of(self, machine: int) -> tuple[int, ...]:
        """The group (connected component) that `machine` belongs to."""
        self._check_machine(machine)
        return next(group for group in self.groups if machine in group)

    def lost_checkpoints(self, failed: Iterable[int]) -> tuple[int, ...]:
        """The machines whose every holder is in `failed`: their checkpoints are gone from memory.

        Raises:
            PlacementError: `failed` names a machine outside 0..N-1.
        """
        down = {self._check_machine(machine) for machine in failed}
        return tuple(sorted(owner for owner in down if all(h in down for h in self.holders[owner])))

    def recoverable(self, failed: Iterable[int]) -> bool:
        """Whether every checkpoint still has a copy on a machine outside `failed`."""
        return not self.lost_checkpoints(failed)

    def _check_machine(self, machine: int) -> int:
        if not 0 <= machine < len(self.holders):
            raise PlacementError(f"machine {machine} is outside 0..{len(self.holders) - 1}")
        return machine


def _check_holders(holders: tuple[tuple[int, ...], ...]) -> None:
    if not holders:
        raise PlacementError("a placement needs at least one machine")
    count, replicas = len(holders), len(holders[0])
    for owner, held_by in enumerate(holders):
        if len(held_by) != replicas:
            raise PlacementError(
                f"machine {owner} has {len(held_by)} holders, machine 0 has {replicas}: "
                "every machine needs the same number of copies"
            )
        if held_by[0] != owner:
            raise PlacementError(f"machine {owner}'s first holder is {held_by[0]}, not itself")
        if len(set(held_by)) != len(held_by):
            raise PlacementError(f"machine {owner}'s holders {held_by} are not distinct")
        if any(not 0 <= h < count for h in held_by):
            raise PlacementError(f"machine {owner}'s holders {held_by} leave 0..{count - 1}")


def _components(holders: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """Connected components of the graph joining each machine to its holders (union-find)."""
    parent = list(range(len(holders)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for owner, held_by in enumerate(holders):
        for h in held_by:
            parent[find(h)] = find(owner)
    members: dict[int, list[int]] = {}
    for machine in range(len(holders)):
        members.setdefault(find(machine), []).append(machine)
    return tuple(sorted(tuple(group) for group in members.values()))


def _check_groups(
    groups: tuple[tuple[int, ...], ...], holders: tuple[tuple[int, ...], ...]
) -> None:
    seen = sorted(machine for group in groups for machine in group)
    if seen != list(range(len(holders))):
        raise PlacementError(f"groups {groups} do not partition machines 0..{len(holders) - 1}")
    where = {machine: index for index, group in enumerate(groups) for machine in group}
    for owner, held_by in enumerate(holders):
        if len({where[h] for h in held_by}) != 1:
            raise PlacementError(f"machine {owner}'s holders {held_by} span several groups")
