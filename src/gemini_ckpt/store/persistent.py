"""The persistent tier: complete checkpoints written to a directory, readable by standard tools.

Layout: `<location>/<job>/step-<S>/rank-<r>.safetensors` plus `rank-<r>.manifest.json`, where the
location is a directory or an fsspec URL. The data file is a valid safetensors file whose byte
section is the rank's data region verbatim (tensors named by their place in the training state,
alignment gaps as `__pad__` tensors), so `safetensors.torch.load_file` reads it and the manifest's
chunk checksums still apply. The manifest (JSON, never pickle) holds the full state skeleton. It is
written last, through a temporary name (fsynced where the backend can): a rank's copy of a step
exists exactly when its manifest does.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from gemini_ckpt.errors import CorruptCheckpointError, StoreError
from gemini_ckpt.protocol.manifest import Manifest
from gemini_ckpt.store.files import open_files

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
    """Complete checkpoints of one job under `location`; safe for one writer per rank.

    `location` is a directory or an fsspec URL (`s3://bucket/prefix`, `file:///mnt/ckpt`, ...;
    `store.files`). Methods raise `StoreError` for I/O failures and `CorruptCheckpointError` for
    copies that fail verification. Nothing here unpickles anything.
    """

    def __init__(self, location: str | Path, job: str, keep: int = 2) -> None:
        if keep < 1:
            raise StoreError(f"the persistent tier must keep at least 1 step, got keep={keep}")
        self._files = open_files(location)
        self.directory = self._files.join(self._files.root, job)
        self.location = f"{str(location).rstrip('/')}/{job}"
        self.keep = keep

    def step_dir(self, step: int) -> str:
        """Where `step` lives, in the backend's path syntax."""
        return self._files.join(self.directory, f"step-{step:012d}")

    def write(self, manifest: Manifest, data: memoryview) -> str:
        """Write one rank's copy of a step: the data file, then the manifest.

        `data` is the rank's data region (at least `manifest.data_nbytes` bytes).
        """
        files = self._files
        directory = self.step_dir(manifest.step)
        final = files.join(directory, f"rank-{manifest.rank}.safetensors")
        try:
            files.makedirs(directory)
            with files.open_write(final, atomic=False) as f:
                f.write(safetensors_header(manifest))
                for start in range(0, manifest.data_nbytes, _COPY_BLOCK):
                    f.write(data[start : min(start + _COPY_BLOCK, manifest.data_nbytes)])
            # Ordering: the manifest appears only after the data file is durable under its name.
            manifest_path = files.join(directory, f"rank-{manifest.rank}.manifest.json")
            with files.open_write(manifest_path, atomic=True) as f:
                f.write(manifest.to_json().encode("utf-8"))
            files.sync_dir(directory)
        except files.errors as e:
            raise StoreError(
                f"cannot persist rank {manifest.rank} step {manifest.step} to {self.location}: {e}"
            ) from e
        return final

    def inventory(self) -> dict[int, list[int]]:
        """Ranks -> steps with a complete copy (manifest present), oldest first."""
        held: dict[int, list[int]] = {}
        for step, directory in self._step_dirs():
            for name in sorted(self._listdir(directory)):
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
        path = self._files.join(self.step_dir(step), f"rank-{rank}.manifest.json")
        try:
            with self._files.open_read(path) as f:
                text = f.read()
        except FileNotFoundError as e:
            raise StoreError(
                f"no persisted copy of rank {rank} step {step} in {self.location}"
            ) from e
        except self._files.errors as e:
            raise StoreError(f"cannot read {path}: {e}") from e
        manifest = Manifest.from_json(text)
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
        path = self._files.join(self.step_dir(step), f"rank-{rank}.safetensors")
        header = safetensors_header(manifest)
        try:
            with self._files.open_read(path) as f:
                got_header = f.read(len(header))
                got = _read_fully(f, dest[: manifest.data_nbytes]) if got_header == header else 0
        except FileNotFoundError as e:
            raise CorruptCheckpointError(f"{path} is missing although its manifest exists") from e
        except self._files.errors as e:
            raise StoreError(f"cannot read {path}: {e}") from e
        if got_header != header:
            raise CorruptCheckpointError(f"{path}: header does not match its manifest")
        if got != manifest.data_nbytes:
            raise CorruptCheckpointError(
                f"{path} is truncated: {got} of {manifest.data_nbytes} data bytes"
            )
        return manifest

    def mark_bad(self, rank: int, step: int) -> None:
        """Set aside `rank`'s copy of `step` after it failed verification (kept for inspection)."""
        path = self._files.join(self.step_dir(step), f"rank-{rank}.manifest.json")
        try:
            self._files.rename(path, path + ".corrupt")
        except FileNotFoundError:
            pass
        except self._files.errors as e:
            log.error("cannot set aside %s: %s", path, e)
        log.error(
            "persisted rank %d step %d failed verification; set aside as rank-%d.manifest.json"
            ".corrupt",
            rank,
            step,
            rank,
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
            try:
                self._files.remove_tree(self.step_dir(step))
            except self._files.errors as e:
                raise StoreError(f"cannot delete persisted step {step}: {e}") from e
        return doomed

    def _step_dirs(self) -> list[tuple[int, str]]:
        names = self._listdir(self.directory)
        found = [
            (int(m.group(1)), self._files.join(self.directory, n))
            for n in names
            if (m := _STEP_DIR.match(n))
        ]
        return sorted(found)

    def _listdir(self, path: str) -> list[str]:
        try:
            return self._files.listdir(path)
        except self._files.errors as e:
            raise StoreError(f"cannot list {path}: {e}") from e


def _read_fully(f: IO[bytes], dest: memoryview) -> int:
    """Fill `dest` from `f` (readinto may return short counts on remote files); bytes read."""
    got = 0
    while got < len(dest):
        n = f.readinto(dest[got : got + _COPY_BLOCK])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got
