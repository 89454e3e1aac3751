"""The machine's checkpoint memory: two shared-memory slots per rank, under a memory budget.

Owned by the machine agent, so it outlives trainer processes. Thread-safe: the agent serves each
trainer connection on its own thread. An agent has two: one for its own ranks (written by its
trainers) and one for the replicas of its peers' ranks (written by the replication server); both
reserve from the machine's one `MemoryBudget`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gemini_ckpt.config import format_size
from gemini_ckpt.errors import StoreError
from gemini_ckpt.protocol.manifest import Manifest
from gemini_ckpt.store import shm
from gemini_ckpt.store.budget import MemoryBudget
from gemini_ckpt.store.slots import SLOTS_PER_RANK, RankSlots, SlotStatus, WriteGrant

_CAPACITY_GRANULE = 1 << 20
READ_WAIT_S = 60.0
"""Longest a write waits for the agent to finish reading the slot (a memory copy takes far less)."""


@dataclass(frozen=True)
class MemoryUsage:
    """Bytes reserved for checkpoint slots on this machine, against its budget."""

    budget: int
    reserved: int
    """Everything the machine reserved: this store's slots and other stores' on the same budget."""
    per_rank: dict[int, int]
    """This store's slots, per rank."""

    def describe(self) -> str:
        """One line for logs and status output."""
        return (
            f"{format_size(self.reserved)} of {format_size(self.budget)} checkpoint memory in use"
        )


@dataclass(frozen=True)
class SlotRef:
    """Where a committed checkpoint lies: the data file, its mapped size, and its manifest."""

    rank: int
    slot: int
    path: Path
    capacity: int
    manifest: Manifest
    epoch: int = 0
    """The slot's write epoch when located: see `LocalStore.unchanged`."""


class LocalStore:
    """Checkpoint slots for ranks, in files under `directory`.

    `kind` is "own" (this machine's ranks) or "replica" (peers' ranks held for them); it names the
    store's reservations in the shared budget and in errors.
    """

    def __init__(self, directory: Path, budget: int | MemoryBudget, kind: str = "own") -> None:
        self.directory = directory
        self.budget = budget if isinstance(budget, MemoryBudget) else MemoryBudget(budget)
        self.kind = kind
        self._ranks: dict[int, RankSlots] = {}
        # Bumped whenever a slot's bytes may change; a reader that must not block writers (the
        # replication sender) checks it after reading to know its bytes were not torn.
        self._epochs: dict[tuple[int, int], int] = {}
        self._capacity: dict[int, int] = {}
        self._lock = threading.Lock()
        # Slots being read by the agent itself (persisting); a write into one waits for the read.
        self._readers: dict[tuple[int, int], int] = {}
        self._read_done = threading.Condition(self._lock)

    def start(self) -> None:
        """Create the directory (private to this user)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def close(self) -> None:
        """Release all checkpoint memory: unlink every file and the directory."""
        shutil.rmtree(self.directory, ignore_errors=True)
        with self._lock:
            for rank in self._capacity:
                self.budget.release(self._holder(rank))

    def _holder(self, rank: int) -> str:
        return f"{self.kind} rank {rank}"

    def _bump(self, rank: int, slot: int) -> None:
        self._epochs[(rank, slot)] = self._epochs.get((rank, slot), 0) + 1

    def data_path(self, rank: int, slot: int) -> Path:
        """The shared-memory file of `rank`'s `slot`."""
        return self.directory / f"r{rank}.s{slot}.data"

    def _manifest_path(self, rank: int, slot: int) -> Path:
        return self.directory / f"r{rank}.s{slot}.manifest.json"

    def _slots(self, rank: int) -> RankSlots:
        if rank not in self._ranks:
            self._ranks[rank] = RankSlots(rank)
            self._capacity[rank] = 0
        return self._ranks[rank]

    def allocate(self, rank: int, nbytes: int) -> int:
        """Make both of `rank`'s slots hold at least `nbytes`; return the slot capacity.

        Raises:
            MemoryBudgetError: the machine's budget or /dev/shm cannot hold the slots.
        """
        with self._lock:
            self._slots(rank)
            current = self._capacity[rank]
            if nbytes <= current:
                return current
            capacity = -(-nbytes // _CAPACITY_GRANULE) * _CAPACITY_GRANULE
            whose = f"rank {rank}" if self.kind == "own" else f"the replica of rank {rank}"
            self.budget.reserve(
                self._holder(rank),
                capacity * SLOTS_PER_RANK,
                f"{whose} needs {SLOTS_PER_RANK} slots of {format_size(capacity)}",
            )
            for slot in range(SLOTS_PER_RANK):
                shm.reserve(self.data_path(rank, slot), capacity)
            self._capacity[rank] = capacity
            return capacity

    def capacity(self, rank: int) -> int:
        """Current slot capacity of `rank` (0 before its first allocation)."""
        with self._lock:
            return self._capacity.get(rank, 0)

    def prepare_write(self, rank: int, step: int, give_up: int | None = None) -> WriteGrant:
        """Choose the slot for `rank`'s `step` without changing anything (see `RankSlots.grant`)."""
        with self._lock:
            if self._capacity.get(rank, 0) == 0:
                raise StoreError(f"rank {rank} has no slots yet; allocate before saving")
            return self._slots(rank).grant(step, give_up)

    def begin_write(self, rank: int, grant: WriteGrant) -> Path:
        """Start writing per `grant`; its slot stops holding a visible checkpoint. Returns its file.

        Raises:
            StoreError: the slots changed since the grant was made.
        """
        with self._lock:
            if not self._read_done.wait_for(
                lambda: not self._readers.get((rank, grant.slot)), timeout=READ_WAIT_S
            ):
                raise StoreError(
                    f"rank {rank} slot {grant.slot} is still being read after {READ_WAIT_S:.0f} s"
                )
            slots = self._slots(rank)
            give_up = grant.overwrites if grant.replaces_newest else None
            if slots.grant(grant.step, give_up) != grant:
                raise StoreError(f"rank {rank}'s slots changed while step {grant.step} waited")
            # Ordering: the old manifest goes before any new byte lands: a torn slot never has one.
            shm.unlink(self._manifest_path(rank, grant.slot))
            self._bump(rank, grant.slot)
            slots.begin(grant)
            return self.data_path(rank, grant.slot)

    def commit(self, rank: int, slot: int, manifest: Manifest) -> None:
        """Commit a fully written slot by writing its manifest (atomically, by rename).

        Raises:
            StoreError: the slot is not being written for this step.
            CorruptCheckpointError: the manifest is inconsistent or larger than the slot.
        """
        with self._lock:
            manifest.validate(capacity=self._capacity.get(rank, 0))
            if manifest.rank != rank:
                raise StoreError(f"manifest of rank {manifest.rank} sent for rank {rank}")
            slots = self._slots(rank)
            writing = slots.writing()
            if writing is None or slots.slots.index(writing) != slot:
                raise StoreError(f"rank {rank} slot {slot} is not being written; nothing to commit")
            # Ordering: the trainer sends the manifest only after every chunk is copied and hashed;
            # rename makes it appear whole or not at all.
            final = self._manifest_path(rank, slot)
            tmp = final.with_suffix(".tmp")
            try:
                tmp.write_text(manifest.to_json(), encoding="utf-8")
                os.replace(tmp, final)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise StoreError(
                    f"cannot write the manifest of rank {rank} step {manifest.step}: {e}"
                ) from e
            slots.commit(slot, manifest)

    def abort_writes(self, rank: int) -> int | None:
        """Forget `rank`'s unfinished write (torn by a crash); return the step it was for."""
        with self._lock:
            return self._slots(rank).abort_writing() if rank in self._ranks else None

    def abort_write(self, rank: int, step: int) -> bool:
        """Forget `rank`'s unfinished write of `step` (only that one); True if there was one."""
        with self._lock:
            slots = self._ranks.get(rank)
            writing = slots.writing() if slots else None
            if slots is None or writing is None or writing.step != step:
                return False
            slots.abort_writing()
            return True

    def writing_step(self, rank: int) -> int | None:
        """The step `rank` is writing now, or None."""
        with self._lock:
            slot = self._ranks[rank].writing() if rank in self._ranks else None
            return slot.step if slot is not None else None

    def inventory(self) -> dict[int, list[int]]:
        """Committed steps per rank, oldest first."""
        with self._lock:
            return {rank: slots.committed_steps() for rank, slots in sorted(self._ranks.items())}

    def latest(self, rank: int) -> int | None:
        """Newest committed step of `rank`, or None."""
        with self._lock:
            return self._ranks[rank].latest() if rank in self._ranks else None

    def locate(self, rank: int, step: int) -> SlotRef | None:
        """Where `rank`'s committed `step` lies, or None if it is not held."""
        with self._lock:
            return self._locate(rank, step)

    def _locate(self, rank: int, step: int) -> SlotRef | None:
        slots = self._ranks.get(rank)
        index = slots.slot_of(step) if slots else None
        if slots is None or index is None:
            return None
        manifest = slots.slots[index].manifest
        if manifest is None or slots.slots[index].status is not SlotStatus.COMMITTED:
            return None
        return SlotRef(
            rank,
            index,
            self.data_path(rank, index),
            self._capacity[rank],
            manifest,
            self._epochs.get((rank, index), 0),
        )

    def unchanged(self, ref: SlotRef) -> bool:
        """Whether `ref`'s slot still holds its step, untouched since `ref` was located.

        A reader that does not hold the slot with `reading()` (so as never to delay a trainer)
        checks this after reading: True means no byte it read was being overwritten.
        """
        with self._lock:
            current = self._locate(ref.rank, ref.manifest.step)
            return current is not None and current.slot == ref.slot and current.epoch == ref.epoch

    @contextlib.contextmanager
    def reading(self, rank: int, step: int) -> Iterator[SlotRef | None]:
        """Hold `rank`'s committed `step` steady while the agent reads it (None if not held).

        A trainer's write into that slot waits until the block ends, so keep the block short (a
        memory copy, not a disk write).
        """
        with self._lock:
            ref = self._locate(rank, step)
            if ref is not None:
                self._readers[(rank, ref.slot)] = self._readers.get((rank, ref.slot), 0) + 1
        try:
            yield ref
        finally:
            if ref is not None:
                with self._lock:
                    self._readers[(rank, ref.slot)] -= 1
                    self._read_done.notify_all()

    def install(self, manifest: Manifest, fill: Callable[[memoryview], None]) -> SlotRef:
        """Make `manifest`'s step the only one its rank holds, its bytes written by `fill`.

        For restores from another tier: whatever the rank held is forgotten, slot 0 receives the
        data (`fill` gets a writable view of `manifest.data_nbytes` bytes) and is committed with
        `manifest`. The caller verifies the bytes first.
        """
        rank = manifest.rank
        self.allocate(rank, manifest.data_nbytes)
        with self._lock:
            slots = self._slots(rank)
            for step in slots.committed_steps():
                index = slots.slot_of(step)
                if index is not None:
                    shm.unlink(self._manifest_path(rank, index))
                slots.drop(step)
            slots.abort_writing()
            self._bump(rank, 0)
            slots.begin(WriteGrant(0, manifest.step, None, None))
        region = shm.map_file(self.data_path(rank, 0), manifest.data_nbytes, writable=True)
        try:
            fill(region.view())
        finally:
            region.close()
        self.commit(rank, 0, manifest)
        ref = self.locate(rank, manifest.step)
        if ref is None:
            raise StoreError(f"rank {rank} step {manifest.step} vanished right after installing")
        return ref

    def drop(self, rank: int, step: int) -> bool:
        """Forget `rank`'s committed `step` (reported corrupt); True if it was held."""
        with self._lock:
            slots = self._ranks.get(rank)
            index = slots.slot_of(step) if slots else None
            if slots is None or index is None:
                return False
            shm.unlink(self._manifest_path(rank, index))
            self._bump(rank, index)
            return slots.drop(step)

    def truncate_after(self, step: int) -> dict[int, list[int]]:
        """Forget every committed step newer than `step`, on all ranks; return what was dropped."""
        dropped = {}
        for rank, steps in self.inventory().items():
            newer = [s for s in steps if s > step]
            for s in newer:
                self.drop(rank, s)
            if newer:
                dropped[rank] = newer
        return dropped

    def usage(self) -> MemoryUsage:
        """Reserved bytes, in total and per rank."""
        with self._lock:
            per_rank = {r: c * SLOTS_PER_RANK for r, c in sorted(self._capacity.items())}
            return MemoryUsage(self.budget.limit, self.budget.reserved(), per_rank)
