"""Files in /dev/shm that hold checkpoint bytes, owned by the machine agent.

The agent creates and sizes them (with `posix_fallocate`, so tmpfs pages are reserved up front
and a full /dev/shm is an error at allocation instead of a SIGBUS mid-copy); trainers map them
with MAP_POPULATE so the first copy into a slot runs at warm-memory speed. Plain files are used
instead of `multiprocessing.shared_memory`, whose resource tracker unlinks segments when an
attaching process exits (Python < 3.13).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gemini_ckpt.errors import MemoryBudgetError, StoreError


def reserve(path: Path, nbytes: int) -> None:
    """Create `path` (mode 0600) or grow it to at least `nbytes`, reserving the memory now.

    Raises:
        MemoryBudgetError: the shared-memory file system has no room for `nbytes`.
        StoreError: the file cannot be created.
    """
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError as e:
        raise StoreError(f"cannot create shared-memory file {path}: {e}") from e
    try:
        if os.fstat(fd).st_size < nbytes:
            os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        raise MemoryBudgetError(
            f"cannot reserve {nbytes} bytes for {path}: {e.strerror} (is /dev/shm full?)"
        ) from e
    finally:
        os.close(fd)


@dataclass
class MappedRegion:
    """A mapping of a shared-memory file as a flat uint8 tensor; `close()` unmaps it."""

    path: Path
    nbytes: int
    mm: mmap.mmap
    tensor: torch.Tensor
    pinned: bool = False
    """Page-locked for device-to-host copies (the owner unregisters it before `close()`)."""

    def view(self) -> memoryview:
        """The mapped bytes as a memoryview (for checksums)."""
        return memoryview(self.mm)

    def close(self) -> None:
        """Drop the tensor and unmap (the file itself stays)."""
        self.tensor = torch.empty(0, dtype=torch.uint8)
        # A view of the mapping may still be alive somewhere; then the mapping goes when it does.
        with contextlib.suppress(BufferError):
            self.mm.close()


def map_file(path: Path, nbytes: int, *, writable: bool) -> MappedRegion:
    """Map the first `nbytes` of an existing shared-memory file.

    Raises:
        StoreError: the file is missing or smaller than `nbytes`.
    """
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    try:
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except OSError as e:
        raise StoreError(f"cannot open shared-memory file {path}: {e}") from e
    try:
        size = os.fstat(fd).st_size
        if size < nbytes:
            raise StoreError(f"shared-memory file {path} holds {size} bytes, expected {nbytes}")
        if nbytes == 0:
            mm = mmap.mmap(-1, 1)
            tensor = torch.empty(0, dtype=torch.uint8)
        else:
            mm = mmap.mmap(fd, nbytes, flags=flags, prot=prot)
            tensor = torch.frombuffer(mm, dtype=torch.uint8) if writable else _readonly(mm)
    finally:
        os.close(fd)
    return MappedRegion(path, nbytes, mm, tensor)


def _readonly(mm: mmap.mmap) -> torch.Tensor:
    # torch.frombuffer needs a writable buffer; a read-only mapping is wrapped through NumPy, and
    # torch's warning about non-writable arrays is moot because nothing writes through this view.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.frombuffer(mm, dtype=np.uint8))


def unlink(path: Path) -> None:
    """Remove a shared-memory file if it exists (mappings stay valid until unmapped)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
