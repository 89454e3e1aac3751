"""Mappings of slot files kept across transfers, so a slot's pages are mapped once, not per push.

Mapping (and populating) a slot costs about 90 ms per GiB on the development machine: as much as
a tenth of sending it over loopback. Slot files live as long as their store, so each user (a
server's receiver, its provider, a peer link) keeps its mappings and reuses them. A file that was
replaced (another inode) or grew is mapped anew; one that is gone is unmapped.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gemini_ckpt.errors import StoreError


@dataclass
class _Mapping:
    inode: int
    size: int
    mm: mmap.mmap


class SlotMappings:
    """Whole-file shared mappings of slot files, read-only or writable; thread-safe.

    `close()` unmaps everything (a view still in use keeps its mapping alive until it goes).
    """

    def __init__(self, writable: bool) -> None:
        self._writable = writable
        self._maps: dict[Path, _Mapping] = {}
        self._lock = threading.Lock()

    def view(self, path: Path, nbytes: int) -> memoryview:
        """The first `nbytes` of `path`, mapped (reusing the mapping made for an earlier call).

        Raises:
            StoreError: the file cannot be opened, is smaller than `nbytes`, or cannot be mapped.
        """
        if nbytes == 0:
            return memoryview(b"" if not self._writable else bytearray())
        with self._lock:
            self._prune()
            current = self._maps.get(path)
            if current is None or current.size < nbytes:
                if current is not None:
                    _unmap(self._maps.pop(path))
                current = self._map(path, nbytes)
                self._maps[path] = current
            return memoryview(current.mm)[:nbytes]

    def close(self) -> None:
        """Unmap every file."""
        with self._lock:
            for mapping in self._maps.values():
                _unmap(mapping)
            self._maps.clear()

    def _prune(self) -> None:
        """Forget mappings of files that are gone or were replaced by another file."""
        for path, mapping in list(self._maps.items()):
            try:
                inode = os.stat(path).st_ino
            except OSError:
                inode = -1
            if inode != mapping.inode:
                _unmap(self._maps.pop(path))

    def _map(self, path: Path, nbytes: int) -> _Mapping:
        try:
            fd = os.open(path, os.O_RDWR if self._writable else os.O_RDONLY)
        except OSError as e:
            raise StoreError(f"cannot open shared-memory file {path}: {e.strerror}") from e
        try:
            stat = os.fstat(fd)
            if stat.st_size < nbytes:
                raise StoreError(
                    f"shared-memory file {path} holds {stat.st_size} bytes, expected {nbytes}"
                )
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if self._writable else 0)
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mm = mmap.mmap(fd, stat.st_size, flags=flags, prot=prot)
        except OSError as e:
            raise StoreError(f"cannot map shared-memory file {path}: {e.strerror}") from e
        finally:
            os.close(fd)
        return _Mapping(stat.st_ino, stat.st_size, mm)


def _unmap(mapping: _Mapping) -> None:
    # A view handed out earlier may still be in use; the mapping then goes when it does.
    with contextlib.suppress(BufferError):
        mapping.mm.close()


@contextlib.contextmanager
def mapped_range(path: Path, start: int, end: int, writable: bool) -> Iterator[memoryview]:
    """Bytes [start, end) of `path`, mapped (and populated) for the duration of the block.

    Only the pages of the range are mapped, so parts of one file can be mapped, filled and
    unmapped by several threads at once instead of one after the other.

    Raises:
        StoreError: the file cannot be opened or mapped, or holds fewer than `end` bytes.
    """
    if end <= start:
        yield memoryview(bytearray())
        return
    base = start - start % mmap.ALLOCATIONGRANULARITY
    try:
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except OSError as e:
        raise StoreError(f"cannot open shared-memory file {path}: {e.strerror}") from e
    try:
        size = os.fstat(fd).st_size
        if size < end:
            raise StoreError(f"shared-memory file {path} holds {size} bytes, expected {end}")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mm = mmap.mmap(fd, end - base, flags=flags, prot=prot, offset=base)
    except OSError as e:
        raise StoreError(f"cannot map shared-memory file {path}: {e.strerror}") from e
    finally:
        os.close(fd)
    whole = memoryview(mm)
    view = whole[start - base :]
    try:
        yield view
    finally:
        view.release()
        whole.release()
        _unmap(_Mapping(0, 0, mm))
