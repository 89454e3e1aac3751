"""Reading a checkpoint back: verify every chunk, then copy each tensor out of the mapping."""

from __future__ import annotations

import torch

from gemini_ckpt.errors import CorruptCheckpointError
from gemini_ckpt.protocol.manifest import Manifest
from gemini_ckpt.snapshot.copier import ChunkCopier
from gemini_ckpt.store.shm import MappedRegion


def verified_tensors(
    copier: ChunkCopier, manifest: Manifest, region: MappedRegion, source: str
) -> list[torch.Tensor]:
    """The stored tensors, in entry order, after every chunk passed its checksum.

    Tensors are copied out, so the slot can be overwritten later without touching them.

    Raises:
        CorruptCheckpointError: a chunk fails its checksum, or an entry's geometry is impossible.
    """
    data = region.view()[: manifest.data_nbytes]
    bad = copier.verify(manifest.chunk_digests, manifest.chunk_size, data)
    if bad:
        shown = ", ".join(str(i) for i in bad[:8]) + (" ..." if len(bad) > 8 else "")
        raise CorruptCheckpointError(
            f"rank {manifest.rank} step {manifest.step} from {source}: {len(bad)} of "
            f"{manifest.num_chunks} chunks fail their {manifest.checksum_algorithm} checksum "
            f"(chunk {shown}); refusing to load it"
        )
    tensors = []
    for i, entry in enumerate(manifest.entries):
        dtype = getattr(torch, entry.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise CorruptCheckpointError(f"tensor entry {i} has unknown dtype {entry.dtype!r}")
        numel = 1
        for dim in entry.shape:
            numel *= dim
        if numel * dtype.itemsize != entry.nbytes:
            raise CorruptCheckpointError(
                f"tensor entry {i}: shape {entry.shape} of {entry.dtype} "
                f"is not {entry.nbytes} bytes"
            )
        raw = region.tensor[entry.offset : entry.offset + entry.nbytes]
        tensors.append(raw.view(dtype).reshape(entry.shape).clone())
    return tensors
