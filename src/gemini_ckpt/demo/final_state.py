"""The complete final state of a rank, written at the end of a demo run and compared across runs."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemini_ckpt.snapshot.sharded import local_shard


def collect(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, data: Any, step: int
) -> dict[str, Any]:
    """Model, optimizer, scheduler, data position and every RNG state, as tensors and plain data.

    A sharded (FSDP2) model's DTensors are kept as this rank's local shards.
    """
    np_state: Any = np.random.get_state()
    return {
        "step": step,
        "model": _local(model.state_dict()),
        "optimizer": _local(optimizer.state_dict()),
        "scheduler": scheduler.state_dict(),
        "data": data.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]),
        },
    }


def _local(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return local_shard(tree)
    if isinstance(tree, dict):
        return {k: _local(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_local(v) for v in tree)
    return tree


def write(state: dict[str, Any], directory: Path, rank: int) -> Path:
    """Save one rank's final state."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"rank{rank}.pt"
    torch.save(state, path)
    return path


def first_difference(a: Any, b: Any, path: str = "state") -> str | None:
    """Where two states differ (exact, bit for bit), or None if they are identical."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return _tensor_difference(a, b, path)
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{path}: keys {sorted(map(str, set(a) ^ set(b)))} differ"
        pairs = [(a[k], b[k], f"{path}[{k!r}]") for k in a]
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        pairs = [(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True))]
    else:
        return None if a == b else f"{path}: {a!r} vs {b!r}"
    return next((d for x, y, p in pairs if (d := first_difference(x, y, p))), None)


def _tensor_difference(a: Any, b: Any, path: str) -> str | None:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    # Bitwise: NaN payloads and signed zeros count, as they would for resumed training.
    same = torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )
    return None if same else f"{path}: values differ"


def compare_dirs(expected: Path, actual: Path, world_size: int) -> list[str]:
    """Differences between two runs' final states, one line per differing rank."""
    problems = []
    for rank in range(world_size):
        a_path, b_path = expected / f"rank{rank}.pt", actual / f"rank{rank}.pt"
        if not a_path.exists() or not b_path.exists():
            problems.append(f"rank {rank}: final state missing ({a_path} or {b_path})")
            continue
        a = torch.load(a_path, weights_only=True)
        b = torch.load(b_path, weights_only=True)
        found = first_difference(a, b)
        if found:
            problems.append(f"rank {rank}: {found}")
    return problems
