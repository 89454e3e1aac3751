"""Read-only mappings of part of a slot's data file, for sending its bytes without copying them."""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gemini_ckpt.errors import StoreError


@contextmanager
def mapped_range(path: Path, start: int, end: int) -> Iterator[tuple[memoryview, int]]:
    """Bytes [start, end) of `path` (and the pages before `start` in the same page), read-only.

    Yields the view and the file offset its first byte lies at, so byte `i` of the file is
    `view[i - base]`. Only these pages are mapped (and populated), not the whole slot.

    Raises:
        StoreError: the file cannot be opened or holds fewer than `end` bytes.
    """
    base = start - start % mmap.ALLOCATIONGRANULARITY
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise StoreError(f"cannot open shared-memory file {path}: {e.strerror}") from e
    try:
        size = os.fstat(fd).st_size
        if size < end:
            raise StoreError(f"shared-memory file {path} holds {size} bytes, expected {end}")
        if end <= base:
            mm = mmap.mmap(-1, 1)
        else:
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mm = mmap.mmap(fd, end - base, flags=flags, prot=mmap.PROT_READ, offset=base)
    finally:
        os.close(fd)
    view = memoryview(mm)
    try:
        yield view, base
    finally:
        view.release()
        # A slice may outlive this block in a traceback; the mapping then goes when it does.
        with contextlib.suppress(BufferError):
            mm.close()
