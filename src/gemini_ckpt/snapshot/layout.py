"""Where each tensor goes in a slot's data region, and which pieces make up each checksummed chunk.

Pure computation over tensor metadata. Tensors that are the same memory (tied weights) are stored
once. The layout is cached by the checkpointer and reused while the state keeps its shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemini_ckpt.protocol.manifest import ALIGNMENT, TensorEntry


@dataclass(frozen=True)
class Segment:
    """`length` bytes of stored entry `entry`, from byte `src_start` of it, to `dst_offset`."""

    entry: int
    src_start: int
    length: int
    dst_offset: int


@dataclass(frozen=True)
class Layout:
    """Placement of a state's tensors in a data region cut into chunks of `chunk_size` bytes."""

    entries: tuple[TensorEntry, ...]
    tensor_refs: tuple[int, ...]
    data_nbytes: int
    chunk_size: int
    chunks: tuple[tuple[Segment, ...], ...]
    signature: tuple[object, ...]

    @property
    def num_chunks(self) -> int:
        """How many chunks the data region is cut into."""
        return len(self.chunks)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """The byte range [start, end) of chunk `index`."""
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.data_nbytes)


def _identity(tensor: torch.Tensor) -> tuple[object, ...]:
    """Two tensors with the same identity are the same bytes (tied parameters, shared state)."""
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def signature(tensors: list[torch.Tensor]) -> tuple[object, ...]:
    """What a cached layout depends on: shapes, dtypes and which tensors are shared."""
    seen: dict[tuple[object, ...], int] = {}
    sig: list[object] = []
    for tensor in tensors:
        key = _identity(tensor)
        sig.append(seen.setdefault(key, len(seen)))
        sig.append((tensor.dtype, tuple(tensor.shape)))
    return tuple(sig)


def plan_layout(tensors: list[torch.Tensor], chunk_size: int) -> Layout:
    """Assign every distinct tensor an aligned offset and cut the region into chunks."""
    entry_of: dict[tuple[object, ...], int] = {}
    entries: list[TensorEntry] = []
    refs: list[int] = []
    offset = 0
    for tensor in tensors:
        key = _identity(tensor)
        if key not in entry_of:
            nbytes = tensor.numel() * tensor.element_size()
            entry_of[key] = len(entries)
            dtype = str(tensor.dtype).removeprefix("torch.")
            entries.append(TensorEntry(dtype, tuple(tensor.shape), offset, nbytes))
            offset += -(-nbytes // ALIGNMENT) * ALIGNMENT
        refs.append(entry_of[key])
    data_nbytes = offset
    return Layout(
        entries=tuple(entries),
        tensor_refs=tuple(refs),
        data_nbytes=data_nbytes,
        chunk_size=chunk_size,
        chunks=_cut(entries, data_nbytes, chunk_size),
        signature=signature(tensors),
    )


def _cut(
    entries: list[TensorEntry], data_nbytes: int, chunk_size: int
) -> tuple[tuple[Segment, ...], ...]:
    """Split each entry at chunk boundaries; alignment padding belongs to no segment."""
    num_chunks = -(-data_nbytes // chunk_size)
    chunks: list[list[Segment]] = [[] for _ in range(num_chunks)]
    for index, entry in enumerate(entries):
        done = 0
        while done < entry.nbytes:
            dst = entry.offset + done
            chunk = dst // chunk_size
            length = min(entry.nbytes - done, (chunk + 1) * chunk_size - dst)
            chunks[chunk].append(Segment(index, done, length, dst))
            done += length
    return tuple(tuple(c) for c in chunks)
