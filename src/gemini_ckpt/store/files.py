"""Where the persistent tier's files live: a local directory, or any filesystem fsspec reaches.

The persistent tier needs only a few operations, and the two backends differ in what they can
promise: a local directory renames atomically and fsyncs, so every file appears whole or not at
all; an fsspec filesystem (object stores above all) has no cheap rename, so large files are written
under their final name and the tier relies on its own commit rule instead — a rank's copy exists
once its small manifest does, and the manifest is the last thing written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol

from gemini_ckpt.errors import ConfigError, StoreError


class Files(Protocol):
    """The file operations the persistent tier uses; paths are strings in the backend's syntax."""

    root: str
    errors: tuple[type[Exception], ...]
    """What its I/O failures raise (turned into `StoreError` by the persistent tier)."""

    def join(self, *parts: str) -> str:
        """`parts` joined under the backend's syntax."""

    def makedirs(self, path: str) -> None:
        """Create `path` and its parents (a no-op where directories are implicit)."""

    def open_write(
        self, path: str, *, atomic: bool
    ) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A file to write; `atomic`: it appears under `path` whole or not at all."""

    def open_read(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A file to read. Raises FileNotFoundError if there is none."""

    def listdir(self, path: str) -> list[str]:
        """Names (not paths) directly under `path`; empty if it does not exist."""

    def rename(self, src: str, dst: str) -> None:
        """Move `src` to `dst`. Raises FileNotFoundError if `src` is gone."""

    def remove_tree(self, path: str) -> None:
        """Delete `path` and everything under it; missing is fine."""

    def sync_dir(self, path: str) -> None:
        """Make the names created under `path` durable (a no-op where there is nothing to do)."""


def parse_location(text: str) -> str | Path | None:
    """A `--persist-dir` value: None when empty, a URL kept verbatim, anything else a path.

    (A `Path` would fold a URL's `//`.) A URL's protocol is checked now, so that a typo or a
    missing fsspec package is an error at start, not a failed write hours later.

    Raises:
        ConfigError: the URL's protocol is unknown or its package is not installed.
    """
    if not text:
        return None
    if "://" not in text:
        return Path(text)
    try:
        open_files(text)
    except StoreError as e:
        raise ConfigError(f"--persist-dir: {e}") from e
    return text


def open_files(location: str | Path) -> Files:
    """The backend for `location`: a URL with a scheme goes to fsspec, anything else is local.

    Raises:
        StoreError: the URL's protocol is unknown or its fsspec implementation is not installed.
    """
    text = str(location)
    if "://" not in text:
        return LocalFiles(Path(text))
    # Imported here: only jobs that persist to a URL pay for it.
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as e:
        raise StoreError(f"cannot use {text!r} as the persistent tier: {e}") from e
    return FsspecFiles(fs, path, text)


class LocalFiles:
    """A local (or network-mounted) directory: atomic renames and fsync."""

    errors: tuple[type[Exception], ...] = (OSError,)

    def __init__(self, root: Path) -> None:
        """See `Files.__init__`."""
        self.root = str(root)

    def join(self, *parts: str) -> str:
        """See `Files.join`."""
        return os.path.join(*parts)

    def makedirs(self, path: str) -> None:
        """See `Files.makedirs`."""
        os.makedirs(path, exist_ok=True)

    @contextlib.contextmanager
    def open_write(self, path: str, *, atomic: bool) -> Iterator[IO[bytes]]:
        """See `Files.open_write`."""
        # Always through a temporary name here: it is free, and torn files are never visible.
        del atomic
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def open_read(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """See `Files.open_read`."""
        return open(path, "rb")

    def listdir(self, path: str) -> list[str]:
        """See `Files.listdir`."""
        try:
            return os.listdir(path)
        except FileNotFoundError:
            return []

    def rename(self, src: str, dst: str) -> None:
        """See `Files.rename`."""
        os.replace(src, dst)

    def remove_tree(self, path: str) -> None:
        """See `Files.remove_tree`."""
        shutil.rmtree(path, ignore_errors=True)

    def sync_dir(self, path: str) -> None:
        """See `Files.sync_dir`."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class FsspecFiles:
    """Any fsspec filesystem (s3://, gs://, memory://, file://, ...)."""

    # Remote implementations raise their own types (botocore, aiohttp, google.api_core, ...): any
    # of them failing a write must fail that write, not the thread doing it.
    errors: tuple[type[Exception], ...] = (Exception,)

    def __init__(self, fs: Any, root: str, url: str) -> None:
        """See `Files.__init__`."""
        self._fs = fs
        self.root = root
        self.url = url

    def join(self, *parts: str) -> str:
        """See `Files.join`."""
        return "/".join(p.rstrip("/") for p in parts)

    def makedirs(self, path: str) -> None:
        """See `Files.makedirs`."""
        self._fs.makedirs(path, exist_ok=True)

    @contextlib.contextmanager
    def open_write(self, path: str, *, atomic: bool) -> Iterator[IO[bytes]]:
        """See `Files.open_write`."""
        # A rename on an object store is a full server-side copy: the large data file is written
        # in place (an upload becomes visible only when complete; a torn file on a filesystem is
        # harmless because the manifest written after it is what makes the copy exist).
        target = f"{path}.tmp-{os.getpid()}" if atomic else path
        try:
            with self._fs.open(target, "wb") as f:
                yield f
                f.flush()
                _fsync_if_local(f)
            if atomic:
                self._fs.mv(target, path)
        except BaseException:
            with contextlib.suppress(Exception):
                self._fs.rm(target)
            raise

    def open_read(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """See `Files.open_read`."""
        opened: contextlib.AbstractContextManager[IO[bytes]] = self._fs.open(path, "rb")
        return opened

    def listdir(self, path: str) -> list[str]:
        """See `Files.listdir`."""
        try:
            found = self._fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        except TypeError:  # implementations without the `refresh` keyword
            found = self._fs.ls(path, detail=False)
        return [str(p).rstrip("/").rsplit("/", 1)[-1] for p in found]

    def rename(self, src: str, dst: str) -> None:
        """See `Files.rename`."""
        if not self._fs.exists(src):
            raise FileNotFoundError(src)
        self._fs.mv(src, dst)

    def remove_tree(self, path: str) -> None:
        """See `Files.remove_tree`."""
        with contextlib.suppress(FileNotFoundError):
            self._fs.rm(path, recursive=True)

    def sync_dir(self, path: str) -> None:
        """See `Files.sync_dir`."""
        del path


def _fsync_if_local(f: Any) -> None:
    """Call fsync when the fsspec file wraps a descriptor (file://); object stores have none."""
    try:
        fd = f.fileno()
    except (AttributeError, OSError, ValueError, NotImplementedError):
        return
    if isinstance(fd, int):
        try:
            os.fsync(fd)
        except OSError as e:
            raise StoreError(f"cannot fsync {getattr(f, 'path', f)}: {e}") from e
