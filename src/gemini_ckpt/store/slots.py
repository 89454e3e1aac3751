"""The two checkpoint slots of one rank: which holds the last complete step, which is being written.

A pure state machine; the machine store (`local_store.py`) wraps it with files and a lock. A slot is
EMPTY, WRITING (data arriving, no manifest: never visible) or COMMITTED (manifest in place). Writing
always goes to the slot that does not hold the newest committed step, so the newest complete
checkpoint survives a crash at any point of the next save.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from gemini_ckpt.errors import StoreError
from gemini_ckpt.protocol.manifest import Manifest

SLOTS_PER_RANK = 2


class SlotStatus(str, Enum):
    """Lifecycle of one slot."""

    EMPTY = "empty"
    WRITING = "writing"
    COMMITTED = "committed"


@dataclass
class Slot:
    """One slot's state; `step` is meaningful unless EMPTY."""

    status: SlotStatus = SlotStatus.EMPTY
    step: int = -1
    manifest: Manifest | None = None


@dataclass(frozen=True)
class WriteGrant:
    """Permission to write `step` into `slot`.

    `overwrites` is the committed step the slot held before (None if it was empty). Overwriting is
    only safe once every rank of the job has committed `keep`, the step this rank keeps in its other
    slot: the caller waits for that before writing.
    """

    slot: int
    step: int
    overwrites: int | None
    keep: int | None
    replaces_newest: bool = False
    """The newest step is given up (some rank skipped it) and the older one kept instead."""


class RankSlots:
    """Slot bookkeeping for one rank."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.slots = [Slot() for _ in range(SLOTS_PER_RANK)]

    def committed_steps(self) -> list[int]:
        """Steps held in committed slots, oldest first."""
        return sorted(s.step for s in self.slots if s.status is SlotStatus.COMMITTED)

    def latest(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.committed_steps()
        return steps[-1] if steps else None

    def slot_of(self, step: int) -> int | None:
        """Index of the committed slot holding `step`, or None."""
        for index, slot in enumerate(self.slots):
            if slot.status is SlotStatus.COMMITTED and slot.step == step:
                return index
        return None

    def writing(self) -> Slot | None:
        """The slot being written, if any."""
        return next((s for s in self.slots if s.status is SlotStatus.WRITING), None)

    def grant(self, step: int, give_up: int | None = None) -> WriteGrant:
        """Choose the slot to write `step` into (does not change state; see `begin`).

        Normally the slot of the older step is reused. With `give_up`, the slot holding that
        step (the newest, which some rank of the job skipped, so it can never be common to all)
        is reused instead and the older step is kept.

        Raises:
            StoreError: `step` does not come after the newest committed step, or a write is
                already in progress.
        """
        in_flight = self.writing()
        if in_flight is not None:
            raise StoreError(f"rank {self.rank} is already writing step {in_flight.step}")
        latest = self.latest()
        if latest is not None and step <= latest:
            raise StoreError(
                f"rank {self.rank} cannot save step {step}: steps must increase and step "
                f"{latest} is already committed"
            )
        empty = [i for i, s in enumerate(self.slots) if s.status is SlotStatus.EMPTY]
        if empty:
            return WriteGrant(empty[0], step, None, latest)
        oldest = min(range(SLOTS_PER_RANK), key=lambda i: self.slots[i].step)
        newest = 1 - oldest
        if give_up is not None and self.slots[newest].step == give_up:
            return WriteGrant(newest, step, give_up, self.slots[oldest].step, True)
        return WriteGrant(oldest, step, self.slots[oldest].step, latest)

    def begin(self, grant: WriteGrant) -> None:
        """Mark the granted slot WRITING: from now on it holds no visible checkpoint."""
        self.slots[grant.slot] = Slot(SlotStatus.WRITING, grant.step)

    def commit(self, slot: int, manifest: Manifest) -> None:
        """Mark `slot` COMMITTED with `manifest`.

        Raises:
            StoreError: the slot is not being written, or is being written for another step.
        """
        current = self.slots[slot] if 0 <= slot < SLOTS_PER_RANK else None
        if current is None or current.status is not SlotStatus.WRITING:
            raise StoreError(
                f"rank {self.rank} slot {slot} is not being written; nothing to commit"
            )
        if current.step != manifest.step:
            raise StoreError(
                f"rank {self.rank} slot {slot} is being written for step {current.step}, "
                f"not step {manifest.step}"
            )
        self.slots[slot] = Slot(SlotStatus.COMMITTED, manifest.step, manifest)

    def abort_writing(self) -> int | None:
        """Forget an unfinished write (its data is torn); return the step it was for."""
        for index, slot in enumerate(self.slots):
            if slot.status is SlotStatus.WRITING:
                self.slots[index] = Slot()
                return slot.step
        return None

    def drop(self, step: int) -> bool:
        """Forget committed `step` (found corrupt or abandoned); True if it was held."""
        index = self.slot_of(step)
        if index is None:
            return False
        self.slots[index] = Slot()
        return True
