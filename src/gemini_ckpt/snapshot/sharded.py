"""Sharded tensors (DTensor, as FSDP2's `fully_shard` makes them): each rank keeps its own shard.

A DTensor in the state is snapshotted as its local tensor (`to_local()`: the rank's partition,
never the gathered tensor) plus its sharding in the skeleton: global shape and stride,
placements, the device mesh (device type, rank layout, dimension names) and this rank's
coordinate in it. On restore, each saved shard goes back into the DTensor the running job has
at the same place in its state, in place, after checking that the sharding is the same; where
the running job has none yet (an optimizer that has not stepped), the shard is wrapped into a
DTensor on the running job's mesh of the same layout. A checkpoint is never resharded: a
different world size, mesh or placement is a `RestoreError` naming the entry.

DTensor is imported only if this torch provides it (torch.distributed.tensor, 2.4+; the private
torch.distributed._tensor before), so the trainer side imports nothing FSDP-specific otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

import torch

from gemini_ckpt.errors import RestoreError, SnapshotError

try:  # the public module since torch 2.4
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch 2.3, or a build without torch.distributed
    try:
        from torch.distributed._tensor import DTensor, Replicate, Shard  # type: ignore[attr-defined]
    except ImportError:
        DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]

try:  # how FSDP2 shards a dimension that tensor parallelism already split (torch 2.5+)
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover - older torch
    _StridedShard = None  # type: ignore[assignment,misc]

JSON = Any

_SAME_SHARDING = (
    "Each rank restores its own shard, so the world size, mesh and placements must be the same "
    "as when it was saved"
)


@dataclass
class SavedShard:
    """A DTensor as it comes out of a checkpoint: this rank's local tensor and its sharding."""

    local: torch.Tensor
    meta: JSON


def is_sharded(value: object) -> bool:
    """Whether `value` is a DTensor (False when this torch has none)."""
    return DTensor is not None and isinstance(value, DTensor)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own data of `tensor`: a DTensor's local tensor, any other tensor itself."""
    if is_sharded(tensor):
        local: torch.Tensor = cast(Any, tensor).to_local()
        return local
    return tensor


def _placement(placement: Any, path: str) -> JSON:
    # _StridedShard subclasses Shard, so it is asked first.
    if _StridedShard is not None and isinstance(placement, _StridedShard):
        return ["strided_shard", placement.dim, placement.split_factor]
    if isinstance(placement, Shard):
        return ["shard", placement.dim]
    if isinstance(placement, Replicate):
        return ["replicate"]
    raise SnapshotError(
        f"DTensor at {path} has placement {placement!r}; only Shard and Replicate can be "
        "snapshotted (a Partial DTensor is a sum not yet reduced: reduce it in state_dict())"
    )


def _mesh(mesh: Any) -> JSON:
    names = mesh.mesh_dim_names
    return {
        "device_type": mesh.device_type,
        "ranks": mesh.mesh.tolist(),
        "dim_names": list(names) if names is not None else None,
    }


def _coordinate(mesh: Any) -> list[int] | None:
    """This rank's place in `mesh` (None if it is not part of it)."""
    coordinate = mesh.get_coordinate()
    return list(coordinate) if coordinate is not None else None


def describe(tensor: Any, path: str) -> JSON:
    """The sharding of DTensor `tensor` as plain data (what the skeleton stores).

    Raises:
        SnapshotError: a placement other than Shard/Replicate (a pending Partial sum).
    """
    return {
        "shape": list(tensor.shape),
        "stride": list(tensor.stride()),
        "placements": [_placement(p, path) for p in tensor.placements],
        "mesh": _mesh(tensor.device_mesh),
        "coordinate": _coordinate(tensor.device_mesh),
    }


def _decode_placement(raw: JSON) -> Any:
    kind = raw[0]
    if kind == "shard":
        return Shard(int(raw[1]))
    if kind == "replicate":
        return Replicate()
    if kind == "strided_shard" and _StridedShard is not None:
        return _StridedShard(int(raw[1]), split_factor=int(raw[2]))
    raise RestoreError(f"unknown DTensor placement {raw!r} in the checkpoint")


def _show(meta: JSON) -> str:
    """A sharding in words, for error messages."""
    mesh = meta["mesh"]
    placements = ", ".join(
        f"{p[0]}({', '.join(str(x) for x in p[1:])})" if len(p) > 1 else p[0]
        for p in meta["placements"]
    )
    return (
        f"shape {meta['shape']} as [{placements}] over a {mesh['device_type']} mesh of ranks "
        f"{mesh['ranks']} (this rank at {meta['coordinate']})"
    )


def _mesh_key(mesh_meta: JSON) -> str:
    return json.dumps(mesh_meta, sort_keys=True)


def contains_shards(tree: Any) -> bool:
    """Whether a decoded state holds any `SavedShard`."""
    if isinstance(tree, SavedShard):
        return True
    if isinstance(tree, dict):
        return any(contains_shards(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(contains_shards(v) for v in tree)
    return False


class ShardLoader:
    """Puts the `SavedShard`s of a decoded state back into the running job's DTensors.

    `current` is the running job's state in the same shape (its `state_dict()`s): a saved shard
    is copied into the DTensor found at the same place. `meshes` are the device meshes of the
    running job, for shards with no DTensor to go into yet.
    """

    def __init__(self, current: Any, meshes: list[Any]) -> None:
        self._current = current
        self._meshes = {_mesh_key(_mesh(m)): m for m in meshes}

    def load(self, saved: Any) -> Any:
        """`saved` with every `SavedShard` replaced by a DTensor (dicts and lists in place).

        Raises:
            RestoreError: a shard's sharding differs from the running job's (another world size,
                mesh or placement), naming the entry.
        """
        return self._walk(saved, self._current, "")

    def _walk(self, saved: Any, current: Any, path: str) -> Any:
        if isinstance(saved, SavedShard):
            return self._shard(saved, current, path)
        if isinstance(saved, dict):
            here = current if isinstance(current, dict) else {}
            for key in saved:
                sub = f"{path}[{key!r}]" if path else str(key)
                saved[key] = self._walk(saved[key], here.get(key), sub)
            return saved
        if isinstance(saved, (list, tuple)):
            seq = current if isinstance(current, (list, tuple)) else ()
            items = [
                self._walk(v, seq[i] if i < len(seq) else None, f"{path}[{i}]")
                for i, v in enumerate(saved)
            ]
            if isinstance(saved, tuple):
                return tuple(items)
            saved[:] = items
        return saved

    def _shard(self, saved: SavedShard, current: Any, path: str) -> Any:
        meta = saved.meta
        if is_sharded(current):
            here = describe(current, path)
            local = current.to_local()
            if here != meta or (local.dtype, local.shape) != (saved.local.dtype, saved.local.shape):
                raise RestoreError(
                    f"{path} was saved as {_show(meta)} (local {saved.local.dtype}"
                    f"{list(saved.local.shape)}); this run has it as {_show(here)} (local "
                    f"{local.dtype}{list(local.shape)}). {_SAME_SHARDING}"
                )
            with torch.no_grad():
                local.copy_(saved.local)  # in place: the running job's shard, no communication
            return current
        if isinstance(current, torch.Tensor):
            raise RestoreError(
                f"{path} was saved as a shard ({_show(meta)}); this run has an unsharded tensor "
                f"of shape {list(current.shape)} there. {_SAME_SHARDING}"
            )
        mesh = self._meshes.get(_mesh_key(meta["mesh"]))
        if mesh is None or _coordinate(mesh) != meta["coordinate"]:
            raise RestoreError(
                f"{path} was saved as {_show(meta)}; this run has no such mesh with this rank at "
                f"that place. {_SAME_SHARDING}"
            )
        return DTensor.from_local(
            saved.local,
            mesh,
            [_decode_placement(p) for p in meta["placements"]],
            run_check=False,
            shape=torch.Size(meta["shape"]),
            stride=tuple(meta["stride"]),
        )


def meshes_of(*trees: Any) -> list[Any]:
    """The device meshes of the DTensors found in `trees` (nested dicts, lists, tensors)."""
    found: dict[int, Any] = {}
    stack = list(trees)
    while stack:
        item = stack.pop()
        if is_sharded(item):
            found.setdefault(id(item.device_mesh), item.device_mesh)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return list(found.values())
