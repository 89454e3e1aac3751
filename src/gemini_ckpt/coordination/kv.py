"""The small key-value interface the job coordinator needs, and its implementations.

`MemoryKV` (in `memory_kv.py`, re-exported here) is for unit tests and implements the whole
control-plane interface (`ControlKV`, in `control_kv.py`); `TCPStoreKV` wraps torch's TCPStore,
which every torch installation has, for jobs coordinated without etcd; `EtcdKV` (in `etcd_kv.py`)
is the production `ControlKV`. Keys are strings, values bytes. Every call is atomic on its own;
none blocks waiting for a key to appear (waiting is the coordinator's job, with timeouts).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol

import torch.distributed as dist

from gemini_ckpt.coordination.memory_kv import MemoryKV
from gemini_ckpt.errors import CoordinationError

__all__ = ["KV", "MemoryKV", "TCPStoreKV"]

# Exported at run time; torch's type stubs do not list it.
_TCPStore: Any = getattr(dist, "TCPStore")  # noqa: B009


class KV(Protocol):
    """A shared key-value store.

    Raises (every method): CoordinationError when the store cannot be reached.
    """

    def get(self, key: str) -> bytes | None:
        """The value of `key`, or None if it does not exist."""

    def set(self, key: str, value: bytes) -> None:
        """Create or overwrite `key`."""

    def add(self, key: str, delta: int) -> int:
        """Atomically add `delta` to the integer at `key` (0 if absent) and return the result."""

    def compare_set(self, key: str, expected: bytes | None, desired: bytes) -> bool:
        """Set `key` to `desired` iff its value is `expected` (None: absent); True on success."""

    def delete(self, key: str) -> None:
        """Remove `key` if present."""

    def close(self) -> None:
        """Release the connection (idempotent)."""


class TCPStoreKV:
    """KV over torch's TCPStore; `host()` starts a server in this process. See `KV`.

    TCPStore's `compare_set` treats an empty expected value as "absent", so values stored through
    this class are never empty.
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        self._lock = threading.Lock()

    @classmethod
    def host(cls, addr: str, port: int, timeout_s: float = 30.0) -> TCPStoreKV:
        """Serve a store on `addr:port` (0: any free port; see `port`)."""
        try:
            store = _TCPStore(
                addr,
                port,
                is_master=True,
                wait_for_workers=False,
                timeout=timedelta(seconds=timeout_s),
            )
        except (RuntimeError, OSError) as e:
            raise CoordinationError(f"cannot serve the job store on {addr}:{port}: {e}") from e
        return cls(store)

    @classmethod
    def connect(cls, addr: str, port: int, timeout_s: float = 30.0) -> TCPStoreKV:
        """Connect to a store served elsewhere, waiting up to `timeout_s` for it.

        Raises:
            CoordinationError: nothing answers at `addr:port` in time.
        """
        try:
            store = _TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, OSError) as e:
            raise CoordinationError(
                f"cannot reach the job store at {addr}:{port} within {timeout_s:.0f} s: {e}"
            ) from e
        return cls(store)

    @property
    def port(self) -> int:
        """The port the store listens on."""
        return int(self._store.port)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        with self._lock:
            try:
                return fn()
            except (RuntimeError, OSError) as e:
                raise CoordinationError(f"job store {what} failed: {e}") from e

    def get(self, key: str) -> bytes | None:
        """See `KV.get`."""
        if not self._call("check", lambda: self._store.check([key])):
            return None
        return bytes(self._call("get", lambda: self._store.get(key)))

    def set(self, key: str, value: bytes) -> None:
        """See `KV.set`."""
        self._call("set", lambda: self._store.set(key, value))

    def add(self, key: str, delta: int) -> int:
        """See `KV.add`."""
        return int(self._call("add", lambda: self._store.add(key, delta)))

    def compare_set(self, key: str, expected: bytes | None, desired: bytes) -> bool:
        """See `KV.compare_set`."""
        result = self._call(
            "compare_set", lambda: self._store.compare_set(key, expected or b"", desired)
        )
        return bytes(result) == desired

    def delete(self, key: str) -> None:
        """See `KV.delete`."""
        self._call("delete", lambda: self._store.delete_key(key))

    def close(self) -> None:
        """See `KV.close` (the connection closes when the store object goes)."""
