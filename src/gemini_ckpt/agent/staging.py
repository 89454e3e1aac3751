"""Bringing a rank's checkpoint from another tier into its machine's memory before trainers start.

The bytes are verified against the manifest's chunk checksums on the way in; a copy that fails is
marked bad in its tier so the next plan chooses another source, and the caller restarts the plan.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from gemini_ckpt.errors import CorruptCheckpointError, RecoveryError
from gemini_ckpt.recovery.plan import PERSISTENT_TIER, RestorePlan, source_peer
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


PeerFetch = Callable[[int, int, int], float]
"""`fetch(rank, step, machine)`: install `rank`'s `step` from `machine`'s replica into this
machine's memory, verified; returns the seconds taken."""


def stage_plan(
    store: LocalStore,
    persistent: PersistentStore | None,
    plan: RestorePlan,
    ranks: range,
    copier: ChunkCopier,
    fetch: PeerFetch | None = None,
) -> dict[int, tuple[str, float]]:
    """Fill the memory of every rank in `ranks` that the plan restores from another tier.

    Peers first (they are the faster tier), then the persistent tier. Returns each staged rank's
    source and the seconds it took.

    Raises:
        RecoveryError: the plan needs a tier this machine has no access to.
        CorruptCheckpointError: a copy fails verification (it is set aside first).
        ReplicationError: a peer cannot be reached or refuses.
    """
    staged: dict[int, tuple[str, float]] = {}
    if plan.step is None:
        return staged
    by_peer = {r: source_peer(plan.sources.get(r, "")) for r in ranks}
    for rank, machine in by_peer.items():
        if machine is None:
            continue
        if fetch is None:
            raise RecoveryError(
                f"the plan restores rank {rank} from peer machine {machine}, "
                "but this agent does not replicate (--replicas 1)"
            )
        staged[rank] = (plan.sources[rank], fetch(rank, plan.step, machine))
    for rank in ranks:
        if plan.sources.get(rank) != PERSISTENT_TIER:
            continue
        if persistent is None:
            raise RecoveryError(
                f"the plan restores rank {rank} from the persistent tier, "
                "but this machine has no --persist-dir"
            )
        seconds = stage_from_persistent(store, persistent, rank, plan.step, copier)
        staged[rank] = (PERSISTENT_TIER, seconds)
    return staged
