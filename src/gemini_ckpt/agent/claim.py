"""One agent per machine of a job on a host: an exclusive lock on the machine's slot.

Two agents that share a job id and machine index would share a control socket and shared-memory
files and destroy each other's checkpoints. The first takes a non-blocking `flock`; the second is
refused with the holder's pid. Leftovers of an agent that was SIGKILLed (its lock is free again) are
cleaned up by the next one.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from gemini_ckpt.errors import ConfigError


class MachineClaim:
    """`acquire()` before touching the machine's files; `release()` at the end."""

    def __init__(self, lock_path: Path, owned: tuple[Path, ...]) -> None:
        self._lock_path = lock_path
        self._owned = owned
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and clear what a dead predecessor left behind.

        Raises:
            ConfigError: another live agent holds this job's machine slot on this host.
        """
        self._lock_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(
                f"another agent (pid {holder}) already runs this job's machine on this host "
                f"({self._lock_path}); give this job its own --run-id"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        for path in self._owned:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()

    @property
    def held(self) -> bool:
        """Whether this process holds the claim."""
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock and its file (idempotent)."""
        if self._fd is not None:
            self._lock_path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
