"""What an export takes from the persistent tier: the request, and the step and ranks it picks.

Pure functions of the tier's inventory and manifests, returning a decision and its reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gemini_ckpt.errors import ConfigError, CorruptCheckpointError, ExportError
from gemini_ckpt.protocol.manifest import Manifest

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""The run ids `launch` accepts (they name directories)."""


@dataclass(frozen=True)
class ExportRequest:
    """What to export: one step of one job's persistent tier, into the directory `out`."""

    persist_dir: str | Path
    """The persistent tier's location: a directory or an fsspec URL (`store.files`)."""
    job: str
    out: Path
    step: int | None = None
    """None: the newest step every exported rank holds."""
    ranks: tuple[int, ...] | None = None
    """None: every rank with a persisted copy, which must then be the whole job."""
    force: bool = False
    """Replace a non-empty `out`."""

    def __post_init__(self) -> None:
        if not _RUN_ID.match(self.job):
            raise ConfigError(
                f"run id {self.job!r} must be 1-64 letters, digits, '.', '_' or '-' (as for launch)"
            )
        if self.step is not None and self.step < 0:
            raise ConfigError(f"the step to export must be >= 0, got {self.step}")
        if self.ranks is not None and (
            not self.ranks or min(self.ranks) < 0 or len(set(self.ranks)) != len(self.ranks)
        ):
            raise ConfigError(
                f"ranks must be distinct integers >= 0, at least one; got {list(self.ranks)}"
            )


@dataclass(frozen=True)
class Selection:
    """The step and ranks to export, and why (the reason is the log line)."""

    step: int
    ranks: tuple[int, ...]
    reason: str


def join(values: Sequence[int]) -> str:
    """`1, 2, 3`: numbers as messages show them."""
    return ", ".join(str(v) for v in values)


def select(
    inventory: Mapping[int, Sequence[int]], step: int | None, ranks: Sequence[int] | None
) -> Selection:
    """The step and ranks to export from `inventory` (rank -> persisted steps).

    The asked ranks (default: every rank in `inventory`) and the asked step (default: the newest
    step all of them hold).

    Raises:
        ExportError: nothing is persisted, an asked rank has no copy, or no step (or not the
            asked one) is held by every rank chosen.
    """
    if not inventory:
        raise ExportError("no step is persisted")
    chosen = tuple(sorted(ranks)) if ranks is not None else tuple(sorted(inventory))
    absent = [rank for rank in chosen if rank not in inventory]
    if absent:
        raise ExportError(
            f"rank {join(absent)} has no persisted copy (ranks with one: {join(sorted(inventory))})"
        )
    who = f"rank {chosen[0]}" if len(chosen) == 1 else f"all {len(chosen)} ranks {join(chosen)}"
    held = "; ".join(f"rank {rank} holds step {join(inventory[rank])}" for rank in chosen)
    if step is None:
        common = set.intersection(*(set(inventory[rank]) for rank in chosen))
        if not common:
            raise ExportError(f"no step is held by {who} ({held})")
        return Selection(max(common), chosen, f"step {max(common)} is the newest held by {who}")
    lacking = [rank for rank in chosen if step not in inventory[rank]]
    if lacking:
        raise ExportError(f"step {step} is not persisted for rank {join(lacking)} ({held})")
    return Selection(step, chosen, f"step {step}, as asked, is held by {who}")


def check_manifests(manifests: Mapping[int, Manifest], job: str, whole_job: bool) -> int:
    """The world size the manifests (rank -> manifest) agree on.

    With `whole_job`, every rank of that world must be among them.

    Raises:
        CorruptCheckpointError: a manifest names another job, or the ranks disagree on the world.
        ExportError: `whole_job` and some rank of the world has no copy of the step.
    """
    for rank, manifest in manifests.items():
        if manifest.job != job:
            raise CorruptCheckpointError(
                f"rank {rank} step {manifest.step}: the manifest names job {manifest.job!r}, "
                f"not {job!r}"
            )
    worlds = sorted({m.world_size for m in manifests.values()})
    step = next(iter(manifests.values())).step
    if len(worlds) != 1:
        sizes = "; ".join(f"rank {r}: {m.world_size}" for r, m in sorted(manifests.items()))
        raise CorruptCheckpointError(f"step {step}: the ranks disagree on the world size ({sizes})")
    missing = sorted(set(range(worlds[0])) - set(manifests))
    if whole_job and missing:
        raise ExportError(
            f"step {step} of the {worlds[0]}-rank job is incomplete: rank {join(missing)} has no "
            "persisted copy at all (name the ranks to export the others)"
        )
    return worlds[0]
