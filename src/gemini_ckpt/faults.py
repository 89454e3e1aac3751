"""The fault-injection vocabulary shared by tests, the demo and benchmarks.

A fault is written `KIND@key=value,...`, for example `kill-worker@step=12,rank=3`. Parsing and
resolution are pure; the agent executes resolved faults (it sends the real signals).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

from gemini_ckpt.errors import FaultSpecError


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
    # Executed by the test bed, which runs the job's etcd: SIGKILL member `member` (default 0) of
    # a cluster, or stop the (single) server for `seconds` with SIGSTOP, then continue it.
    "kill-etcd-member": ("step", "member"),
    "stop-etcd": ("step", "seconds"),
}
MACHINE_KINDS = ("kill-machine", "kill-root")
ETCD_KINDS = ("kill-etcd-member", "stop-etcd")
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
    """How long a stop-etcd fault keeps etcd stopped."""


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

    def targets(self, machine: int, ranks: range) -> bool:
        """Whether this fault is for the agent of `machine`, which runs `ranks`."""
        if self.kind in ETCD_KINDS:
            return False  # the test bed executes these
        if self.kind in MACHINE_KINDS:
            return self.machine in (machine, -1)
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
    if kind in ETCD_KINDS:
        if "step" not in fields:
            raise FaultSpecError(f"fault {text!r} needs step=S (the step at which it fires)")
        step = _int_field(text, "step", fields["step"], 1)
        # `machine` carries the etcd member's index.
        member = _int_field(text, "member", fields["member"], 0) if "member" in fields else 0
        seconds = _int_field(text, "seconds", fields["seconds"], 1) if "seconds" in fields else 3
        return FaultSpec(kind, step, None, member, FaultPoint.AFTER_COMMIT, text.strip(), seconds)
    return _build_rank_fault(kind, text, fields)


def _build_machine_fault(kind: str, text: str, fields: dict[str, str]) -> FaultSpec:
    if "step" not in fields:
        raise FaultSpecError(f"fault {text!r} needs step=S (the step at which it fires)")
    if kind == "kill-machine" and "machine" not in fields:
        raise FaultSpecError(f"fault {text!r} needs machine=M (the machine to kill)")
    step = _int_field(text, "step", fields["step"], 1)
    machine = _int_field(text, "machine", fields["machine"], 0) if "machine" in fields else None
    return FaultSpec(kind, step, None, machine, FaultPoint.AFTER_COMMIT, text.strip())


def _build_rank_fault(kind: str, text: str, fields: dict[str, str]) -> FaultSpec:
    if "step" not in fields:
        raise FaultSpecError(f"fault {text!r} needs step=S (the step at which it fires)")
    if ("rank" in fields) == ("machine" in fields):
        raise FaultSpecError(f"fault {text!r} needs exactly one of rank=R or machine=M")
    step = _int_field(text, "step", fields["step"], 1)
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
    return FaultSpec(kind, step, rank, machine, point, text.strip())


def resolve_faults(
    specs: list[FaultSpec], machines: int, nproc_per_machine: int, seed: int = 0
) -> list[ResolvedFault]:
    """Bind each fault to a global rank of a job with `machines` x `nproc_per_machine` ranks.

    `machine=M` means that machine's first rank; `rank=random` draws from a generator seeded with
    `seed`, so a run can be replayed.

    Raises:
        FaultSpecError: a rank or machine is outside the job.
    """
    world = machines * nproc_per_machine
    rng = random.Random(seed)
    resolved = []
    for spec in specs:
        if spec.kind in ETCD_KINDS:
            resolved.append(
                ResolvedFault(
                    spec.kind, spec.step, -1, spec.point, spec.text, spec.machine, spec.seconds
                )
            )
            continue
        if spec.kind in MACHINE_KINDS:
            if spec.machine is not None and spec.machine >= machines:
                raise FaultSpecError(
                    f"machine={spec.machine} in fault {spec.text!r} is outside the job's "
                    f"{machines} machines (numbered from 0)"
                )
            target = -1 if spec.machine is None else spec.machine
            resolved.append(ResolvedFault(spec.kind, spec.step, -1, spec.point, spec.text, target))
            continue
        if spec.machine is not None:
            if spec.machine >= machines:
                raise FaultSpecError(
                    f"machine={spec.machine} in fault {spec.text!r} is outside the job's "
                    f"{machines} machines (numbered from 0)"
                )
            rank = spec.machine * nproc_per_machine
        elif spec.rank == -1:
            rank = rng.randrange(world)
        else:
            rank = spec.rank if spec.rank is not None else 0
            if rank >= world:
                raise FaultSpecError(
                    f"rank={rank} in fault {spec.text!r} is outside world size {world}"
                )
        resolved.append(ResolvedFault(spec.kind, spec.step, rank, spec.point, spec.text))
    return resolved
