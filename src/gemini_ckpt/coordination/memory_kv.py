"""`MemoryKV`: the whole `ControlKV` in one process, for unit tests and contract tests.

Re-exported by `kv.py`, where the job coordinator's code has always found it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gemini_ckpt.coordination.control_kv import (
    Compare,
    Delete,
    ErrorCallback,
    Get,
    KeyValue,
    Lease,
    Op,
    Put,
    Range,
    TxnResult,
    Watch,
    WatchCallback,
    WatchEvent,
    txn_add,
    txn_compare_set,
)
from gemini_ckpt.coordination.watch import EventDispatcher
from gemini_ckpt.errors import CoordinationError, LeaseLostError


class MemoryKV:
    """An in-process `ControlKV` (and so a `KV`) for unit tests; thread-safe.

    Lease expiry follows the injected `clock` and is applied lazily, at the start of every call or
    when `expire_leases()` is called, so a test can advance a fake clock and expire leases
    deterministically. Watches can start up to `history` events in the past. `timeout_s` is
    accepted everywhere and ignored (nothing here blocks).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, history: int = 10_000) -> None:
        self._clock = clock
        self._lock = threading.RLock()
        self._data: dict[str, KeyValue] = {}
        self._revision = 1
        self._leases: dict[int, _MemoryLease] = {}
        self._next_lease = 0x1000
        self._history: deque[WatchEvent] = deque(maxlen=history)
        self._compacted = 0
        self._watches: dict[int, _MemoryWatch] = {}
        self._next_watch = 0

    # -- KV ------------------------------------------------------------------------------------

    def get(self, key: str, *, timeout_s: float | None = None) -> bytes | None:  # noqa: ARG002
        """See `KV.get`."""
        kv = self.get_kv(key)
        return None if kv is None else kv.value

    def set(self, key: str, value: bytes, *, timeout_s: float | None = None) -> None:  # noqa: ARG002
        """See `KV.set`."""
        self.put(key, value)

    def add(self, key: str, delta: int, *, timeout_s: float | None = None) -> int:
        """See `ControlKV.add`."""
        return txn_add(self, key, delta, timeout_s or 5.0)

    def compare_set(
        self, key: str, expected: bytes | None, desired: bytes, *, timeout_s: float | None = None
    ) -> bool:
        """See `ControlKV.compare_set`."""
        return txn_compare_set(self, key, expected, desired, timeout_s or 5.0)

    def delete(self, key: str, *, timeout_s: float | None = None) -> None:  # noqa: ARG002
        """See `KV.delete`."""
        self.txn([], [Delete(key)])

    def close(self) -> None:
        """Cancel every watch (idempotent)."""
        with self._lock:
            watches = list(self._watches.values())
        for watch in watches:
            watch.cancel()

    # -- ControlKV -----------------------------------------------------------------------------

    def get_kv(self, key: str, *, timeout_s: float | None = None) -> KeyValue | None:  # noqa: ARG002
        """See `ControlKV.get_kv`."""
        with self._lock:
            self._expire_locked()
            return self._data.get(key)

    def get_prefix(self, prefix: str, *, timeout_s: float | None = None) -> Range:  # noqa: ARG002
        """See `ControlKV.get_prefix`."""
        with self._lock:
            self._expire_locked()
            items = tuple(self._data[k] for k in sorted(self._data) if k.startswith(prefix))
            return Range(items, self._revision)

    def put(self, key: str, value: bytes, *, lease: int = 0, timeout_s: float | None = None) -> int:  # noqa: ARG002
        """See `ControlKV.put`."""
        return self.txn([], [Put(key, value, lease)]).revision

    def delete_prefix(self, prefix: str, *, timeout_s: float | None = None) -> int:  # noqa: ARG002
        """See `ControlKV.delete_prefix`."""
        with self._lock:
            before = len(self._data)
            self.txn([], [Delete(prefix, prefix=True)])
            return before - len(self._data)

    def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
        *,
        timeout_s: float | None = None,  # noqa: ARG002
    ) -> TxnResult:
        """See `ControlKV.txn`."""
        with self._lock:
            self._expire_locked()
            succeeded = all(c.holds(self._data.get(c.key)) for c in compares)
            ops = success if succeeded else failure
            for op in ops:
                if isinstance(op, Put) and op.lease and op.lease not in self._leases:
                    raise LeaseLostError(f"lease {op.lease:x} does not exist (expired or revoked)")
            revision = self._revision + 1
            reads: list[KeyValue | None] = []
            events: list[WatchEvent] = []
            for op in ops:
                if isinstance(op, Get):
                    reads.append(self._data.get(op.key))
                elif isinstance(op, Put):
                    events.append(self._put_locked(op, revision))
                elif op.prefix:
                    keys = [k for k in sorted(self._data) if k.startswith(op.key)]
                    events.extend(self._delete_locked(k, revision) for k in keys)
                elif op.key in self._data:
                    events.append(self._delete_locked(op.key, revision))
            self._publish_locked(events)
            return TxnResult(succeeded, self._revision, tuple(reads))

    def grant_lease(self, ttl_s: int, *, timeout_s: float | None = None) -> Lease:  # noqa: ARG002
        """See `ControlKV.grant_lease`."""
        if ttl_s < 1:
            raise CoordinationError(f"a lease TTL must be >= 1 s, got {ttl_s}")
        with self._lock:
            self._expire_locked()
            self._next_lease += 1
            self._leases[self._next_lease] = _MemoryLease(ttl_s, self._clock() + ttl_s)
            return Lease(self._next_lease, ttl_s)

    def refresh_lease(self, lease_id: int, *, timeout_s: float | None = None) -> int:  # noqa: ARG002
        """See `ControlKV.refresh_lease`."""
        with self._lock:
            self._expire_locked()
            lease = self._leases.get(lease_id)
            if lease is None:
                raise LeaseLostError(f"lease {lease_id:x} expired or was revoked")
            lease.expires_at = self._clock() + lease.ttl_s
            return lease.ttl_s

    def revoke_lease(self, lease_id: int, *, timeout_s: float | None = None) -> None:  # noqa: ARG002
        """See `ControlKV.revoke_lease`."""
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is not None:
                self._drop_keys_locked(lease)

    def expire_leases(self) -> int:
        """Expire every lease whose TTL ran out by the clock now; returns how many did."""
        with self._lock:
            return self._expire_locked()

    def watch_prefix(
        self,
        prefix: str,
        callback: WatchCallback,
        *,
        start_revision: int,
        on_error: ErrorCallback | None = None,
        timeout_s: float | None = None,  # noqa: ARG002
    ) -> Watch:
        """See `ControlKV.watch_prefix`."""
        with self._lock:
            self._expire_locked()
            dispatcher = EventDispatcher(f"gemini-watch-{prefix}", callback, on_error)
            if 0 < start_revision <= self._compacted:
                dispatcher.fail(
                    CoordinationError(
                        f"cannot watch {prefix!r} from revision {start_revision}: "
                        f"history up to {self._compacted} is gone"
                    )
                )
            for event in self._history:
                if event.revision >= start_revision > 0 and event.key.startswith(prefix):
                    dispatcher.push(event)
            self._next_watch += 1
            watch = _MemoryWatch(self, self._next_watch, prefix, dispatcher)
            self._watches[self._next_watch] = watch
        dispatcher.start()
        return watch

    # -- internals (the caller holds the lock) -------------------------------------------------

    def _put_locked(self, op: Put, revision: int) -> WatchEvent:
        old = self._data.get(op.key)
        if old is not None and old.lease in self._leases:
            self._leases[old.lease].keys.discard(op.key)
        created, version = (old.create_revision, old.version + 1) if old else (revision, 1)
        kv = KeyValue(op.key, op.value, created, revision, version, op.lease)
        self._data[op.key] = kv
        if op.lease:
            self._leases[op.lease].keys.add(op.key)
        return WatchEvent(
            "put", op.key, op.value, revision, kv.create_revision, kv.version, op.lease
        )

    def _delete_locked(self, key: str, revision: int) -> WatchEvent:
        old = self._data.pop(key)
        if old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        return WatchEvent("delete", key, b"", revision)

    def _drop_keys_locked(self, lease: _MemoryLease) -> None:
        revision = self._revision + 1
        keys = sorted(k for k in lease.keys if k in self._data)
        self._publish_locked([self._delete_locked(k, revision) for k in keys])

    def _expire_locked(self) -> int:
        now = self._clock()
        expired = [i for i, lease in self._leases.items() if lease.expires_at <= now]
        for lease_id in expired:
            self._drop_keys_locked(self._leases.pop(lease_id))
        return len(expired)

    def _publish_locked(self, events: list[WatchEvent]) -> None:
        if not events:
            return
        self._revision = events[0].revision
        for event in events:
            if len(self._history) == self._history.maxlen:
                self._compacted = self._history[0].revision
            self._history.append(event)
            for watch in self._watches.values():
                if event.key.startswith(watch.prefix):
                    watch.dispatcher.push(event)

    def _forget_watch(self, watch_id: int) -> None:
        with self._lock:
            self._watches.pop(watch_id, None)


@dataclass
class _MemoryLease:
    ttl_s: int
    expires_at: float
    keys: set[str] = field(default_factory=set)


class _MemoryWatch:
    """A watch on a `MemoryKV`; see `Watch`."""

    def __init__(self, kv: MemoryKV, watch_id: int, prefix: str, dispatcher: EventDispatcher):
        self._kv = kv
        self._id = watch_id
        self.prefix = prefix
        self.dispatcher = dispatcher

    def cancel(self, timeout_s: float = 5.0) -> None:
        """See `Watch.cancel`."""
        self._kv._forget_watch(self._id)
        self.dispatcher.cancel(timeout_s)

    def __enter__(self) -> _MemoryWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()
