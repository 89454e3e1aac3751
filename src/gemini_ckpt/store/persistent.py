"""The persistent tier: complete checkpoints written to a directory, readable by standard tools.

Layout: `<root>/<job>/step-<S>/rank-<r>.safetensors` plus `rank-<r>.manifest.json`. The data
file is a valid safetensors file whose byte section is the rank's data region verbatim (tensors
named by their place in the training state, alignment gaps as `__pad__` tensors), so
`safetensors.torch.load_file` reads it and the manifest's chunk checksums still apply. The manifest
(JSON, never pickle) holds the full state skeleton. Writes go to a temporary name, are fsynced and
renamed, manifest last: a rank's copy of a step exists exactly when its manifest does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from gemini_ckpt.errors import CorruptCheckpointError, StoreError
from gemini_ckpt.protocol.manifest import Manifest

log = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
    "complex64": "C64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}
_STEP_DIR = re.compile(r"^step-(\d+)$")
_MANIFEST = re.compile(r"^rank-(\d+)\.manifest\.json$")
_COPY_BLOCK = 8 << 20


def entry_names(manifest: Manifest) -> list[str]:
    """A unique, readable name per stored entry: where its first reference sits in the state."""
    names: dict[int, str] = {}
    for path, ref in _tensor_paths(manifest.skeleton, ""):
        if 0 <= ref < len(manifest.tensor_refs):
            names.setdefault(manifest.tensor_refs[ref], path or "tensor")
    out, taken = [], set()
    for index in range(len(manifest.entries)):
        name = names.get(index, f"entry{index}")
        while name in taken:
            name += f"#{index}"
        taken.add(name)
        out.append(name)
    return out


def _tensor_paths(node: Any, path: str) -> Iterator[tuple[str, int]]:
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from _tensor_paths(item, f"{path}.{i}" if path else str(i))
    elif isinstance(node, dict):
        if "__tensor__" in node and isinstance(node["__tensor__"], int):
            yield path, node["__tensor__"]
        elif "__ndarray__" in node and isinstance(node["__ndarray__"], list):
            yield path, int(node["__ndarray__"][0])
        elif "__dict__" in node:
            for key, value in node["__dict__"]:
                label = key if isinstance(key, (str, int)) else json.dumps(key, sort_keys=True)
                yield from _tensor_paths(value, f"{path}.{label}" if path else str(label))
        elif "__tuple__" in node:
            yield from _tensor_paths(node["__tuple__"], path)


def safetensors_header(manifest: Manifest) -> bytes:
    """The safetensors header (length prefix included) describing the manifest's data region."""
    header: dict[str, Any] = {
        "__metadata__": {
            "format": manifest.format,
            "job": manifest.job,
            "rank": str(manifest.rank),
            "step": str(manifest.step),
            "manifest": f"rank-{manifest.rank}.manifest.json",
        }
    }
    cursor = 0
    order = sorted(range(len(manifest.entries)), key=lambda i: manifest.entries[i].offset)
    names = entry_names(manifest)
    for index in order:
        entry = manifest.entries[index]
        if entry.offset > cursor:
            header[f"__pad__{cursor}"] = {
                "dtype": "U8",
                "shape": [entry.offset - cursor],
                "data_offsets": [cursor, entry.offset],
            }
        dtype = _SAFETENSORS_DTYPES.get(entry.dtype)
        shape = list(entry.shape) if dtype else [entry.nbytes]
        header[names[index] if dtype else f"__raw__{entry.dtype}__{names[index]}"] = {
            "dtype": dtype or "U8",
            "shape": shape,
            "data_offsets": [entry.offset, entry.offset + entry.nbytes],
        }
        cursor = entry.offset + entry.nbytes
    if manifest.data_nbytes > cursor:
        header[f"__pad__{cursor}"] = {
            "dtype": "U8",
            "shape": [manifest.data_nbytes - cursor],
            "data_offsets": [cursor, manifest.data_nbytes],
        }
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class PersistentStore:
    """Complete checkpoints of one job under `root`; safe for one writer per rank.

    Methods raise `StoreError` for I/O failures and `CorruptCheckpointError` for copies that fail
    verification. Nothing here unpickles anything.
    """

    def __init__(self, root: Path, job: str, keep: int = 2) -> None:
        if keep < 1:
            raise StoreError(f"the persistent tier must keep at least 1 step, got keep={keep}")
        self.directory = root / job
        self.keep = keep

    def step_dir(self, step: int) -> Path:
        """The directory of `step`."""
        return self.directory / f"step-{step:012d}"

    def write(self, manifest: Manifest, data: memoryview) -> Path:
        """Write one rank's copy of a step: data file, fsync, rename, then the manifest likewise.

        `data` is the rank's data region (at least `manifest.data_nbytes` bytes).
        """
        directory = self.step_dir(manifest.step)
        final = directory / f"rank-{manifest.rank}.safetensors"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with _atomic(final) as f:
                f.write(safetensors_header(manifest))
                for start in range(0, manifest.data_nbytes, _COPY_BLOCK):
                    f.write(data[start : min(start + _COPY_BLOCK, manifest.data_nbytes)])
            # Ordering: the manifest appears only after the data file is durable under its name.
            with _atomic(directory / f"rank-{manifest.rank}.manifest.json") as f:
                f.write(manifest.to_json().encode("utf-8"))
            _fsync_dir(directory)
        except OSError as e:
            raise StoreError(
                f"cannot persist rank {manifest.rank} step {manifest.step} to {directory}: {e}"
            ) from e
        return final

    def inventory(self) -> dict[int, list[int]]:
        """Ranks -> steps with a complete copy (manifest present), oldest first."""
        held: dict[int, list[int]] = {}
        for step, directory in self._step_dirs():
            for name in sorted(os.listdir(directory)):
                match = _MANIFEST.match(name)
                if match:
                    held.setdefault(int(match.group(1)), []).append(step)
        return {rank: sorted(steps) for rank, steps in sorted(held.items())}

    def read_manifest(self, rank: int, step: int) -> Manifest:
        """The manifest of `rank`'s copy of `step`.

        Raises:
            StoreError: there is no such copy.
            CorruptCheckpointError: the manifest is malformed or belongs to another rank or step.
        """
        path = self.step_dir(step) / f"rank-{rank}.manifest.json"
        try:
            manifest = Manifest.from_json(path.read_bytes())
        except FileNotFoundError as e:
            raise StoreError(
                f"no persisted copy of rank {rank} step {step} in {self.directory}"
            ) from e
        if (manifest.rank, manifest.step) != (rank, step):
            raise CorruptCheckpointError(
                f"{path} holds rank {manifest.rank} step {manifest.step}, "
                f"not rank {rank} step {step}"
            )
        return manifest

    def read_into(self, rank: int, step: int, dest: memoryview) -> Manifest:
        """Copy `rank`'s persisted data region of `step` into `dest`; return its manifest.

        The caller verifies the chunk checksums (the bytes are the same as in memory).

        Raises:
            StoreError: no such copy, or `dest` is too small.
            CorruptCheckpointError: the data file is truncated or its header does not match.
        """
        manifest = self.read_manifest(rank, step)
        if len(dest) < manifest.data_nbytes:
            raise StoreError(
                f"{len(dest)} bytes cannot hold {manifest.data_nbytes} bytes of "
                f"rank {rank} step {step}"
            )
        path = self.step_dir(step) / f"rank-{rank}.safetensors"
        header = safetensors_header(manifest)
        try:
            with path.open("rb") as f:
                if f.read(len(header)) != header:
                    raise CorruptCheckpointError(f"{path}: header does not match its manifest")
                got = f.readinto(dest[: manifest.data_nbytes])
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e}") from e
        if got != manifest.data_nbytes:
            raise CorruptCheckpointError(
                f"{path} is truncated: {got} of {manifest.data_nbytes} data bytes"
            )
        return manifest

    def mark_bad(self, rank: int, step: int) -> None:
        """Set aside `rank`'s copy of `step` after it failed verification (kept for inspection)."""
        path = self.step_dir(step) / f"rank-{rank}.manifest.json"
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, path.with_name(path.name + ".corrupt"))
        log.error(
            "persisted rank %d step %d failed verification; set aside as %s.corrupt",
            rank,
            step,
            path.name,
        )

    def collect(self) -> list[int]:
        """Delete all but the newest `keep` steps that every rank found has complete; return them.

        Steps newer than the oldest kept one are never deleted (they may still be being written).
        """
        inventory = self.inventory()
        if not inventory:
            return []
        complete = sorted(set.intersection(*(set(s) for s in inventory.values())))
        if len(complete) <= self.keep:
            return []
        oldest_kept = complete[-self.keep]
        doomed = [step for step, _ in self._step_dirs() if step < oldest_kept]
        for step in doomed:
            shutil.rmtree(self.step_dir(step), ignore_errors=True)
        return doomed

    def _step_dirs(self) -> list[tuple[int, Path]]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        found = [(int(m.group(1)), self.directory / n) for n in names if (m := _STEP_DIR.match(n))]
        return sorted(found)


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[BinaryIO]:
    """Write `path` through a temporary file: fsync, then rename into place on success."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
