"""Bringing a rank's checkpoint from another tier into its machine's memory before trainers start.

The bytes are verified against the manifest's chunk checksums on the way in; a copy that fails is
marked bad in its tier so the next plan chooses another source, and the caller restarts the plan.
"""

from __future__ import annotations

import logging
import time

from gemini_ckpt.errors import CorruptCheckpointError, RecoveryError
from gemini_ckpt.recovery.plan import PERSISTENT_TIER, RestorePlan
from gemini_ckpt.snapshot.copier import ChunkCopier
from gemini_ckpt.store.local_store import LocalStore
from gemini_ckpt.store.persistent import PersistentStore

log = logging.getLogger(__name__)


def stage_from_persistent(
    store: LocalStore, persistent: PersistentStore, rank: int, step: int, copier: ChunkCopier
) -> float:
    """Install `rank`'s persisted `step` as its only checkpoint in memory; return the seconds taken.

    Raises:
        CorruptCheckpointError: the persisted copy fails verification (it is marked bad first).
        StoreError: the copy cannot be read or the memory cannot be allocated.
    """
    started = time.monotonic()
    manifest = persistent.read_manifest(rank, step)

    def fill(view: memoryview) -> None:
        persistent.read_into(rank, step, view)
        bad = copier.verify(
            manifest.chunk_digests, manifest.chunk_size, view[: manifest.data_nbytes]
        )
        if bad:
            raise CorruptCheckpointError(
                f"persisted rank {rank} step {step}: chunks {bad[:8]} fail their checksum"
            )

    try:
        store.install(manifest, fill)
    except CorruptCheckpointError:
        persistent.mark_bad(rank, step)
        store.abort_writes(rank)
        raise
    return time.monotonic() - started


def stage_plan(
    store: LocalStore,
    persistent: PersistentStore | None,
    plan: RestorePlan,
    ranks: range,
    copier: ChunkCopier,
) -> dict[int, float]:
    """Fill the memory of every rank in `ranks` that the plan restores from another tier.

    Returns the seconds each staged rank took.

    Raises:
        RecoveryError: the plan needs the persistent tier and this machine has none.
        CorruptCheckpointError: a copy fails verification (it is set aside first).
    """
    staged = {}
    for rank in ranks:
        if plan.step is None or plan.sources.get(rank) != PERSISTENT_TIER:
            continue
        if persistent is None:
            raise RecoveryError(
                f"the plan restores rank {rank} from the persistent tier, "
                "but this machine has no --persist-dir"
            )
        staged[rank] = stage_from_persistent(store, persistent, rank, plan.step, copier)
    return staged
