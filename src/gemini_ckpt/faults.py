"""The fault-injection vocabulary shared by tests, the demo and benchmarks.

A fault is written `KIND@key=value,...`, for example `kill-worker@step=12,rank=3`. Parsing and
resolution are pure; the agent executes resolved faults (it sends the real signals).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

from gemini_ckpt.errors import FaultSpecError, PlacementError
from gemini_ckpt.placement import place


class FaultPoint(str, Enum):
    """Where in a rank's step a kill-worker fault fires."""

    AFTER_COMMIT = "after-commit"
    """Right after the rank's checkpoint of `step` is committed, during the next iteration."""
    MID_SAVE = "mid-save"
    """While `step` is being written, after some chunks and before the manifest."""


_KINDS = {
    "kill-worker": ("step", "rank", "machine", "point"),
    # The trainer stops making progress (SIGSTOP, as a trainer stuck in a collective looks from
    # outside) right after committing `step`.
    "hang": ("step", "rank", "machine"),
    # The whole machine dies when all its ranks have committed `step`: agent and trainers are
    # SIGKILLed and its shared memory is unlinked (machine=M; kill-root: the root's machine).
    "kill-machine": ("step", "machine"),
    "kill-root": ("step",),
    # Executed by the test bed, which runs the job's etcd: SIGKILL member `member` (default 0;
    # `leader`: whichever leads the raft group then) of a cluster, or stop the (single) server
    # for `seconds` with SIGSTOP, then continue it.
    "kill-etcd-member": ("step", "member"),
    "stop-etcd": ("step", "seconds"),
    # Every machine of placement group `group` dies at `step`, as kill-machine does.
    "kill-group": ("step", "group"),
    # One byte of chunk `chunk` (default 0) of rank R's checkpoint of `step` is flipped, once it
    # is committed: in its machine's memory, in a peer's replica, on the wire to a peer, or in
    # the persistent tier (where=memory|replica|flight|disk).
    "corrupt-chunk": ("step", "rank", "machine", "where", "chunk"),
    # Agents cannot reach each other's replication servers for `seconds` (default 3), from
    # `step` on; machine=M cuts off only M.
    "partition": ("step", "seconds", "machine"),
}
MACHINE_KINDS = ("kill-machine", "kill-root", "kill-group")
LEADER_MEMBER = -1
"""`member=leader` of kill-etcd-member: the member leading the raft group when the fault fires."""
ETCD_KINDS = ("kill-etcd-member", "stop-etcd")
CORRUPT_WHERE = ("memory", "replica", "flight", "disk")
KNOWN_KINDS = tuple(_KINDS)


@dataclass(frozen=True)
class FaultSpec:
    """A fault as written by the user; `rank` may be `None` (use `machine`) or -1 (random)."""

    kind: str
    step: int
    rank: int | None = None
    machine: int | None = None
    point: FaultPoint = FaultPoint.AFTER_COMMIT
    text: str = ""
    seconds: int = 0
    """How long a stop-etcd fault keeps etcd stopped (a partition, the agents apart)."""
    where: str = ""
    """Which copy a corrupt-chunk fault damages."""
    chunk: int = 0
    group: int = 0


@dataclass(frozen=True)
class ResolvedFault:
    """A fault bound to its target; `name` is the spec as given, for logs and summaries.

    Rank faults have `rank`; machine faults have `machine` (-1: whichever machine is the root)
    and `rank` -1.
    """

    kind: str
    step: int
    rank: int
    point: FaultPoint
    name: str
    machine: int | None = None
    seconds: int = 0
    where: str = ""
    chunk: int = 0

    def targets(self, machine: int, ranks: range) -> bool:
        """Whether this fault is for the agent of `machine`, which runs `ranks`."""
        if self.kind in ETCD_KINDS:
            return False  # the test bed executes these
        if self.kind in MACHINE_KINDS or self.kind == "partition":
            return self.machine in (machine, -1)
        if self.kind == "corrupt-chunk" and self.where == "replica":
            return True  # whichever machine holds the replica damages it
        return self.rank in ranks


def _int_field(spec: str, key: str, value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise FaultSpecError(f"{key}={value!r} in fault {spec!r} is not an integer") from None
    if number < minimum:
        raise FaultSpecError(f"{key}={number} in fault {spec!r} must be >= {minimum}")
    return number


def parse_fault(text: str) -> FaultSpec:
    """Parse one `--fault` value.

    Raises:
        FaultSpecError: the kind is unknown, a key is unknown or repeated, or a value is invalid.
    """
    kind, sep, rest = text.strip().partition("@")
    if kind not in _KINDS:
        raise FaultSpecError(
            f"unknown fault kind {kind!r} in {text!r}; known kinds: {', '.join(KNOWN_KINDS)}"
        )
    if not sep or not rest:
        raise FaultSpecError(f"fault {text!r} has no parameters; expected {kind}@step=S,rank=R")
    fields: dict[str, str] = {}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key or not value.strip():
            raise FaultSpecError(
                f"malformed parameter {item!r} in fault {text!r}; expected key=value"
            )
        if key not in _KINDS[kind]:
            raise FaultSpecError(
                f"unknown parameter {key!r} in fault {text!r}; "
                f"{kind} takes {', '.join(_KINDS[kind])}"
            )
        if key in fields:
            raise FaultSpecError(f"parameter {key!r} is given twice in fault {text!r}")
        fields[key] = value.strip()
    if kind in MACHINE_KINDS:
        return _build_machine_fault(kind, text, fields)
    if kind == "partition":
        if "step" not in fields:
            raise FaultSpecError(f"fault {text!r} needs step=S (the step at which it fires)")
        step = _int_field(text, "step", fields["step"], 1)
        seconds = _int_field(text, "seconds", fields["seconds"], 1) if "seconds" in fields else 3
        machine = _int_field(text, "machine", fields["machine"], 0) if "machine" in fields else None
        return FaultSpec(kind, step, None, machine, text=text.strip(), seconds=seconds)
    if kind in ETCD_KINDS:
        if "step" not in fields:
            raise FaultSpecError(f"fault {text!r} needs step=S (the step at which it fires)")
        step = _int_field(text, "step", fields["step"], 1)
        # `machine` carries the etcd member's index (LEADER_MEMBER: chosen when it fires).
        named = fields.get("member", "0")
        member = LEADER_MEMBER if named == "leader" else _int_field(text, "member", named, 0)
        seconds = _int_field(text, "seconds", fields["seconds"], 1) if "seconds" in fields else 3
        return FaultSpec(kind, step, None, member, FaultPoint.AFTER_COMMIT, text.strip(), seconds)
    return _build_rank_fault(kind, text, fields)


def _build_machine_fault(kind: str, text: str, fields: dict[str, str]) -> FaultSpec:
    if "step" not in fields:
        raise FaultSpecError(f"fault {text!r} needs step=S (the step at which it fires)")
    if kind == "kill-machine" and "machine" not in fields:
        raise FaultSpecError(f"fault {text!r} needs machine=M (the machine to kill)")
    if kind == "kill-group" and "group" not in fields:
        raise FaultSpecError(f"fault {text!r} needs group=G (the placement group to kill)")
    step = _int_field(text, "step", fields["step"], 1)
    machine = _int_field(text, "machine", fields["machine"], 0) if "machine" in fields else None
    group = _int_field(text, "group", fields["group"], 0) if "group" in fields else 0
    return FaultSpec(kind, step, None, machine, text=text.strip(), group=group)


def _build_rank_fault(kind: str, text: str, fields: dict[str, str]) -> FaultSpec:
    if "step" not in fields:
        raise FaultSpecError(f"fault {text!r} needs step=S (the step at which it fires)")
    if ("rank" in fields) == ("machine" in fields):
        raise FaultSpecError(f"fault {text!r} needs exactly one of rank=R or machine=M")
    step = _int_field(text, "step", fields["step"], 1)
    where = fields.get("where", "memory" if kind == "corrupt-chunk" else "")
    if kind == "corrupt-chunk" and where not in CORRUPT_WHERE:
        raise FaultSpecError(
            f"where={where!r} in fault {text!r} is not one of {', '.join(CORRUPT_WHERE)}"
        )
    chunk = _int_field(text, "chunk", fields["chunk"], 0) if "chunk" in fields else 0
    rank: int | None = None
    if "rank" in fields:
        rank = -1 if fields["rank"] == "random" else _int_field(text, "rank", fields["rank"], 0)
    machine = _int_field(text, "machine", fields["machine"], 0) if "machine" in fields else None
    try:
        point = FaultPoint(fields.get("point", FaultPoint.AFTER_COMMIT.value))
    except ValueError:
        choices = ", ".join(p.value for p in FaultPoint)
        raise FaultSpecError(
            f"point={fields['point']!r} in fault {text!r} is not one of {choices}"
        ) from None
    return FaultSpec(kind, step, rank, machine, point, text.strip(), where=where, chunk=chunk)


def _group_members(spec: FaultSpec, machines: int, replicas: int) -> tuple[int, ...]:
    try:
        groups = place(machines, min(replicas, machines))[0].groups
    except PlacementError as e:
        raise FaultSpecError(f"fault {spec.text!r}: {e}") from None
    if spec.group >= len(groups):
        raise FaultSpecError(
            f"group={spec.group} in fault {spec.text!r} is outside the placement's "
            f"{len(groups)} groups {list(groups)} (numbered from 0)"
        )
    return groups[spec.group]


def resolve_faults(
    specs: list[FaultSpec],
    machines: int,
    nproc_per_machine: int,
    seed: int = 0,
    replicas: int = 2,
) -> list[ResolvedFault]:
    """Bind each fault to a global rank of a job with `machines` x `nproc_per_machine` ranks.

    `machine=M` means that machine's first rank; `rank=random` draws from a generator seeded with
    `seed`, so a run can be replayed; `kill-group` becomes one fault per member of the group in
    the placement of `replicas` copies.

    Raises:
        FaultSpecError: a rank, machine or group is outside the job.
    """
    world = machines * nproc_per_machine
    rng = random.Random(seed)
    resolved = []
    for spec in specs:
        if spec.kind in ETCD_KINDS or spec.kind in MACHINE_KINDS or spec.kind == "partition":
            resolved.extend(_resolve_machine_level(spec, machines, replicas))
            continue
        if spec.machine is not None:
            rank = _check_machine(spec, machines) * nproc_per_machine
        elif spec.rank == -1:
            rank = rng.randrange(world)
        else:
            rank = spec.rank if spec.rank is not None else 0
            if rank >= world:
                raise FaultSpecError(
                    f"rank={rank} in fault {spec.text!r} is outside world size {world}"
                )
        resolved.append(
            ResolvedFault(
                spec.kind,
                spec.step,
                rank,
                spec.point,
                spec.text,
                where=spec.where,
                chunk=spec.chunk,
            )
        )
    return resolved


def _check_machine(spec: FaultSpec, machines: int) -> int:
    if spec.machine is not None and spec.machine >= machines:
        raise FaultSpecError(
            f"machine={spec.machine} in fault {spec.text!r} is outside the job's "
            f"{machines} machines (numbered from 0)"
        )
    return -1 if spec.machine is None else spec.machine


def _resolve_machine_level(spec: FaultSpec, machines: int, replicas: int) -> list[ResolvedFault]:
    """Faults aimed at machines (etcd members for the etcd kinds) rather than ranks."""
    if spec.kind in ETCD_KINDS:
        # `machine` carries the etcd member's index; the test bed checks it.
        return [
            ResolvedFault(
                spec.kind, spec.step, -1, spec.point, spec.text, spec.machine, spec.seconds
            )
        ]
    if spec.kind == "kill-group":
        return [
            ResolvedFault(spec.kind, spec.step, -1, spec.point, spec.text, member)
            for member in _group_members(spec, machines, replicas)
        ]
    target = _check_machine(spec, machines)
    return [ResolvedFault(spec.kind, spec.step, -1, spec.point, spec.text, target, spec.seconds)]
