"""Writing a persistent tier without an agent: a state flattened, laid out and checksummed the way
a save does it, then written by `PersistentStore.write` (the persister's call)."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemini_ckpt.protocol.manifest import Manifest
from gemini_ckpt.snapshot.copier import ChunkCopier
from gemini_ckpt.snapshot.layout import plan_layout
from gemini_ckpt.snapshot.rng import capture_rng
from gemini_ckpt.snapshot.tree import flatten
from gemini_ckpt.store.persistent import PersistentStore
from helpers.models import Position, make_model, train_step


def persist_state(
    store: PersistentStore,
    job: str,
    state: Any,
    *,
    rank: int,
    step: int,
    world_size: int,
    chunk_size: int = 4096,
) -> Path:
    """Write `state` as `rank`'s persisted copy of `step` of `job`; return the data file's path."""
    flat = flatten(state)
    layout = plan_layout(flat.tensors, chunk_size)
    sources = [None] * len(layout.entries)
    for tensor, ref in zip(flat.tensors, layout.tensor_refs, strict=True):
        sources[ref] = tensor if sources[ref] is None else sources[ref]
    region = torch.zeros(layout.data_nbytes, dtype=torch.uint8)
    copier = ChunkCopier(1)
    try:
        digests = copier.copy(layout, sources, region, range(layout.num_chunks))
    finally:
        copier.close()
    manifest = Manifest(
        job=job,
        rank=rank,
        world_size=world_size,
        step=step,
        generation=0,
        chunk_size=chunk_size,
        data_nbytes=layout.data_nbytes,
        chunk_digests=tuple(digests[i] for i in range(layout.num_chunks)),
        entries=layout.entries,
        tensor_refs=layout.tensor_refs,
        skeleton=flat.skeleton,
    )
    return store.write(manifest, memoryview(region.numpy()))


def training_state(steps: int, seed: int = 0, width: int = 8) -> dict[str, Any]:
    """A deep copy of the state a Checkpointer saves, after `steps` AdamW steps from `seed`."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    model = make_model(width)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    position = Position()
    position.index = seed
    for _ in range(steps):
        train_step(model, optimizer, position)
        scheduler.step()
    return copy.deepcopy(
        {
            "model": model.state_dict(),
            "optimizers": [optimizer.state_dict()],
            "lr_scheduler": scheduler.state_dict(),
            "extra_state": position.state_dict(),
            "rng": capture_rng(),
        }
    )
