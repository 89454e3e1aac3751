"""Real checkpoints in a LocalStore for replication tests: bytes in a slot file, then a manifest."""

from __future__ import annotations

import os

import numpy as np

from gemini_ckpt.protocol.manifest import Manifest, TensorEntry
from gemini_ckpt.snapshot.copier import digest
from gemini_ckpt.store import shm
from gemini_ckpt.store.local_store import LocalStore, SlotRef

JOB = "job-7"
CHUNK = 64 << 10


def payload(nbytes: int, seed: int) -> bytes:
    """Deterministic bytes that differ from seed to seed."""
    index = np.arange(nbytes, dtype=np.int64)
    return ((index * 7 + seed * 13 + (index >> 9)) % 251).astype(np.uint8).tobytes()


def commit(
    store: LocalStore, rank: int, step: int, data: bytes, chunk_size: int = CHUNK
) -> SlotRef:
    """Write `data` into `rank`'s next slot as a trainer would, checksum it, commit it."""
    store.allocate(rank, len(data))
    grant = store.prepare_write(rank, step)
    path = store.begin_write(rank, grant)
    region = shm.map_file(path, len(data), writable=True)
    view = region.view()
    view[: len(data)] = data
    digests = tuple(
        digest(view[i : min(i + chunk_size, len(data))]) for i in range(0, len(data), chunk_size)
    )
    view.release()
    region.close()
    manifest = Manifest(
        job=JOB,
        rank=rank,
        world_size=8,
        step=step,
        generation=0,
        chunk_size=chunk_size,
        data_nbytes=len(data),
        chunk_digests=digests,
        entries=(TensorEntry("uint8", (len(data),), 0, len(data)),),
        tensor_refs=(0,),
        skeleton={"__tensor__": 0},
    )
    store.commit(rank, grant.slot, manifest)
    ref = store.locate(rank, step)
    assert ref is not None
    return ref


def read(store: LocalStore, rank: int, step: int) -> bytes:
    """The committed bytes of `rank`'s `step` in `store` (fails if it is not committed)."""
    ref = store.locate(rank, step)
    assert ref is not None, f"rank {rank} step {step} is not committed in {store.directory}"
    region = shm.map_file(ref.path, ref.manifest.data_nbytes, writable=False)
    view = region.view()
    data = bytes(view[: ref.manifest.data_nbytes])
    view.release()
    region.close()
    return data


def flip_byte(ref: SlotRef, offset: int) -> None:
    """Corrupt one byte of a committed slot's file behind the store's back."""
    fd = os.open(ref.path, os.O_RDWR)
    try:
        old = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([old[0] ^ 0xFF]), offset)
    finally:
        os.close(fd)
