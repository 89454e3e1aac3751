"""The manifest: the self-describing record of one rank's checkpoint of one step.

It is written last, after every data chunk is in place, and committed atomically; a slot
without a valid manifest holds no checkpoint. It lists where each tensor lies in the slot's data
region and the checksum of every fixed-size chunk of that region, so any copy (in shared memory,
on a peer, on disk) can be verified before a single byte is loaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from gemini_ckpt.errors import CorruptCheckpointError

FORMAT = "gemini-ckpt/1"
_ITEMSIZE = {
    str(dtype).removeprefix("torch."): dtype.itemsize
    for dtype in vars(torch).values()
    if isinstance(dtype, torch.dtype)
}
CHECKSUM_ALGORITHM = "xxh3_64"
ALIGNMENT = 64
"""Every tensor starts at a multiple of this, so a byte view can be reinterpreted as any dtype."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one stored tensor's bytes lie in the data region."""

    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Manifest:
    """One rank's checkpoint of one step; `tensor_refs[i]` is the entry of skeleton tensor i."""

    job: str
    rank: int
    world_size: int
    step: int
    generation: int
    chunk_size: int
    data_nbytes: int
    chunk_digests: tuple[str, ...]
    entries: tuple[TensorEntry, ...]
    tensor_refs: tuple[int, ...]
    skeleton: Any
    stats: dict[str, float] = field(default_factory=dict)
    format: str = FORMAT
    checksum_algorithm: str = CHECKSUM_ALGORITHM

    @property
    def num_chunks(self) -> int:
        """How many checksummed chunks the data region is cut into."""
        return -(-self.data_nbytes // self.chunk_size)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """The byte range [start, end) of chunk `index` within the data region."""
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.data_nbytes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (shares the skeleton instead of copying it, unlike `asdict`)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["entries"] = [
            {"dtype": e.dtype, "shape": list(e.shape), "offset": e.offset, "nbytes": e.nbytes}
            for e in self.entries
        ]
        return out

    def to_json(self) -> str:
        """Serialise as compact JSON (the on-wire and on-disk form)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, raw: Any) -> Manifest:
        """Parse and validate a manifest decoded from JSON.

        Raises:
            CorruptCheckpointError: a field is missing, has the wrong type, or the geometry is
                inconsistent (entries outside the data region, wrong number of digests, ...).
        """
        if not isinstance(raw, dict):
            raise CorruptCheckpointError(f"manifest must be an object, got {type(raw).__name__}")
        try:
            manifest = cls(
                job=str(raw["job"]),
                rank=_int(raw, "rank"),
                world_size=_int(raw, "world_size"),
                step=_int(raw, "step"),
                generation=_int(raw, "generation"),
                chunk_size=_int(raw, "chunk_size"),
                data_nbytes=_int(raw, "data_nbytes"),
                chunk_digests=tuple(str(d) for d in raw["chunk_digests"]),
                entries=tuple(_entry(e) for e in raw["entries"]),
                tensor_refs=tuple(int(i) for i in raw["tensor_refs"]),
                skeleton=raw["skeleton"],
                stats={str(k): float(v) for k, v in dict(raw.get("stats", {})).items()},
                format=str(raw.get("format", "")),
                checksum_algorithm=str(raw.get("checksum_algorithm", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpointError(f"malformed manifest: {type(e).__name__}: {e}") from e
        manifest.validate()
        return manifest

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse a manifest from its JSON text (see `from_dict`)."""
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise CorruptCheckpointError(f"manifest is not valid JSON: {e}") from e
        return cls.from_dict(raw)

    def validate(self, capacity: int | None = None) -> None:
        """Check the manifest's internal consistency and, if given, that it fits `capacity` bytes.

        Raises:
            CorruptCheckpointError: the first inconsistency found, with the values involved.
        """
        problems = list(self._problems(capacity))
        if problems:
            raise CorruptCheckpointError(
                f"manifest of rank {self.rank} step {self.step} is invalid: {problems[0]}"
            )

    def _problems(self, capacity: int | None) -> Any:
        if self.format != FORMAT:
            yield f"format {self.format!r} is not {FORMAT!r}"
        if self.checksum_algorithm != CHECKSUM_ALGORITHM:
            yield f"checksum algorithm {self.checksum_algorithm!r} is not {CHECKSUM_ALGORITHM!r}"
        if not 0 <= self.rank < self.world_size or self.step < 0 or self.chunk_size <= 0:
            yield f"rank {self.rank}, world {self.world_size}, step {self.step} are out of range"
        if capacity is not None and self.data_nbytes > capacity:
            yield f"data region of {self.data_nbytes} bytes exceeds the slot's {capacity} bytes"
        if self.data_nbytes < 0 or len(self.chunk_digests) != self.num_chunks:
            yield f"{len(self.chunk_digests)} chunk digests for {self.num_chunks} chunks"
        yield from self._entry_problems()
        if any(not 0 <= ref < len(self.entries) for ref in self.tensor_refs):
            yield "a tensor reference points past the entry table"

    def _entry_problems(self) -> Any:
        end = 0
        for i in sorted(range(len(self.entries)), key=lambda k: self.entries[k].offset):
            entry = self.entries[i]
            if entry.offset < 0 or entry.nbytes < 0 or entry.offset % ALIGNMENT:
                yield f"tensor entry {i} has offset {entry.offset} and size {entry.nbytes}"
            elif entry.offset < end or entry.offset + entry.nbytes > self.data_nbytes:
                yield (
                    f"tensor entry {i} ({entry.offset}+{entry.nbytes}) overlaps another or "
                    f"lies outside the {self.data_nbytes}-byte data region"
                )
            itemsize = _ITEMSIZE.get(entry.dtype)
            if itemsize is None:
                yield f"tensor entry {i} has unknown dtype {entry.dtype!r}"
            elif math.prod(entry.shape) * itemsize != entry.nbytes:
                yield (
                    f"tensor entry {i}: shape {list(entry.shape)} of {entry.dtype} is not "
                    f"{entry.nbytes} bytes"
                )
            end = max(end, entry.offset + entry.nbytes)


def _int(raw: dict[str, Any], key: str) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key} must be an integer, got {value!r}")
    return value


def _entry(raw: Any) -> TensorEntry:
    if not isinstance(raw, dict):
        raise TypeError(f"tensor entry must be an object, got {raw!r}")
    shape = tuple(int(d) for d in raw["shape"])
    if any(d < 0 for d in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    return TensorEntry(str(raw["dtype"]), shape, _int(raw, "offset"), _int(raw, "nbytes"))
