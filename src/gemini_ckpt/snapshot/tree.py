"""Flatten a training state into a JSON skeleton plus a list of tensors, and back.

Tensor data never goes through pickle: each tensor becomes `{"__tensor__": i}` in the skeleton and
its bytes travel separately. A DTensor becomes `{"__dtensor__": [i, sharding]}`: tensor i is its
local shard, and it decodes to a `SavedShard` (see `snapshot.sharded`). Everything else must be
plain data (numbers, strings, bytes, None, lists, tuples and dicts of these, torch
dtypes/sizes/devices, NumPy arrays and scalars). Anything else is refused with the path where it
was found, so a restore can never execute code.
"""

from __future__ import annotations

import base64
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gemini_ckpt.errors import CorruptCheckpointError, SnapshotError
from gemini_ckpt.snapshot.sharded import SavedShard, describe, is_sharded

JSON = Any  # the skeleton: JSON-compatible values only

_SUPPORTED = (
    "tensors, NumPy arrays and scalars, numbers, strings, bytes, None, torch dtypes/sizes/devices "
    "and lists, tuples and dicts of these"
)


@dataclass
class FlatState:
    """A state split into a JSON skeleton and the tensors it refers to by index."""

    skeleton: JSON
    tensors: list[torch.Tensor]


def _tensor_ref(tensor: torch.Tensor, path: str, tensors: list[torch.Tensor]) -> int:
    if tensor.is_sparse or tensor.layout != torch.strided:
        raise SnapshotError(f"sparse tensor at {path} is not supported; densify it in state_dict()")
    if tensor.is_quantized:
        raise SnapshotError(f"quantized tensor at {path} is not supported")
    if tensor.device.type == "meta":
        raise SnapshotError(f"meta tensor at {path} has no data to snapshot")
    if type(tensor) is not torch.Tensor and not isinstance(tensor, torch.nn.Parameter):
        raise SnapshotError(
            f"tensor subclass {type(tensor).__name__} at {path} is not supported "
            "(plain tensors and DTensors are)"
        )
    tensors.append(tensor.detach().resolve_conj().resolve_neg())
    return len(tensors) - 1


class _Encoder:
    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []

    def encode(self, value: Any, path: str) -> JSON:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if is_sharded(value):
            # The rank's shard only; its sharding rides in the skeleton (see snapshot.sharded).
            local = _tensor_ref(value.to_local(), path, self.tensors)
            return {"__dtensor__": [local, describe(value, path)]}
        if isinstance(value, torch.Tensor):
            return {"__tensor__": _tensor_ref(value, path, self.tensors)}
        if isinstance(value, (dict, OrderedDict)):
            return self._encode_dict(value, path)
        if isinstance(value, (list, tuple)):
            return self._encode_sequence(value, path)
        return self._encode_leaf(value, path)

    def _encode_dict(self, value: dict[Any, Any], path: str) -> JSON:
        items = [
            [self.encode(k, f"{path}.<key>"), self.encode(v, f"{path}[{k!r}]")]
            for k, v in value.items()
        ]
        out: dict[str, JSON] = {"__dict__": items}
        if isinstance(value, OrderedDict):
            out["ordered"] = True
            meta = getattr(value, "_metadata", None)
            if meta is not None:
                # nn.Module.state_dict() versions its entries here; load_state_dict reads it back.
                out["metadata"] = self.encode(meta, f"{path}._metadata")
        return out

    def _encode_sequence(self, value: list[Any] | tuple[Any, ...], path: str) -> JSON:
        if isinstance(value, torch.Size):
            return {"__size__": list(value)}
        items = [self.encode(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if type(value) is list else {"__tuple__": items}

    def _encode_leaf(self, value: Any, path: str) -> JSON:
        if isinstance(value, bytes):
            return {"__bytes__": base64.b64encode(value).decode("ascii")}
        if isinstance(value, torch.dtype):
            return {"__dtype__": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"__device__": str(value)}
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise SnapshotError(f"object array at {path} is not supported; {_SUPPORTED}")
            # Stored as raw bytes: torch lacks some NumPy dtypes (e.g. uint32 on older releases).
            raw = torch.from_numpy(np.ascontiguousarray(value).reshape(-1).view(np.uint8).copy())
            index = _tensor_ref(raw, path, self.tensors)
            return {"__ndarray__": [index, value.dtype.str, list(value.shape)]}
        if isinstance(value, np.generic):
            return {"__npscalar__": [value.dtype.str, self.encode(value.item(), path)]}
        raise SnapshotError(
            f"cannot snapshot a value of type {type(value).__module__}.{type(value).__qualname__} "
            f"at {path}; supported are {_SUPPORTED}"
        )


def flatten(state: Any) -> FlatState:
    """Split `state` into a JSON skeleton and its tensors (tensors are referenced, not copied).

    Raises:
        SnapshotError: `state` holds a value that cannot be represented without pickle.
    """
    encoder = _Encoder()
    skeleton = encoder.encode(state, "state")
    return FlatState(skeleton, encoder.tensors)


class _Decoder:
    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors
        self._leaf: dict[str, Callable[[Any], Any]] = {
            "__tensor__": self._tensor,
            "__dtensor__": lambda pair: SavedShard(self._tensor(pair[0]), pair[1]),
            "__ndarray__": self._ndarray,
            "__tuple__": lambda items: tuple(self.decode(v) for v in items),
            "__float__": float,
            "__bytes__": base64.b64decode,
            "__dtype__": self._dtype,
            "__device__": torch.device,
            "__size__": torch.Size,
            "__npscalar__": lambda pair: np.dtype(pair[0]).type(self.decode(pair[1])),
        }

    def _tensor(self, index: Any) -> torch.Tensor:
        if not isinstance(index, int) or not 0 <= index < len(self.tensors):
            raise CorruptCheckpointError(f"skeleton refers to tensor {index!r} that is not stored")
        return self.tensors[index]

    def _ndarray(self, spec: Any) -> np.ndarray[Any, Any]:
        index, dtype, shape = spec
        raw: np.ndarray[Any, Any] = self._tensor(index).numpy()
        out: np.ndarray[Any, Any] = raw.view(np.dtype(dtype)).reshape(shape).copy()
        return out

    @staticmethod
    def _dtype(name: Any) -> torch.dtype:
        dtype = getattr(torch, str(name), None)
        if not isinstance(dtype, torch.dtype):
            raise CorruptCheckpointError(f"unknown dtype {name!r} in checkpoint skeleton")
        return dtype

    def decode(self, node: JSON) -> Any:
        if isinstance(node, list):
            return [self.decode(v) for v in node]
        if not isinstance(node, dict):
            return node
        if "__dict__" in node:
            return self._dict(node)
        if len(node) != 1:
            raise CorruptCheckpointError(f"malformed skeleton node with keys {sorted(node)}")
        ((tag, payload),) = node.items()
        if tag not in self._leaf:
            raise CorruptCheckpointError(f"unknown skeleton tag {tag!r}")
        return self._leaf[tag](payload)

    def _dict(self, node: dict[str, JSON]) -> Any:
        pairs = [(self.decode(k), self.decode(v)) for k, v in node["__dict__"]]
        if not node.get("ordered"):
            return dict(pairs)
        out: OrderedDict[Any, Any] = OrderedDict(pairs)
        if "metadata" in node:
            out._metadata = self.decode(node["metadata"])  # type: ignore[attr-defined]
        return out


def unflatten(skeleton: JSON, tensors: list[torch.Tensor]) -> Any:
    """Rebuild the state from its skeleton and tensors (the inverse of `flatten`).

    Raises:
        CorruptCheckpointError: the skeleton is malformed or refers to a missing tensor.
    """
    try:
        return _Decoder(tensors).decode(skeleton)
    except (TypeError, ValueError, KeyError) as e:
        raise CorruptCheckpointError(f"malformed checkpoint skeleton: {e}") from e
