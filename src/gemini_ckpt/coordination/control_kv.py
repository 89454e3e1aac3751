"""The control-plane KV interface (`ControlKV`) and the values it trades in.

`ControlKV` extends the small `KV` of `kv.py` with what membership, root election and recovery
plans need, shaped after etcd's v3 API: revisions and per-key metadata, range reads by prefix,
leases, multi-key transactions, and watches that resume from a revision. `MemoryKV` (in `kv.py`)
and `EtcdKV` (in `etcd_kv.py`) implement it, `watch.py` delivers watch events for both, and
`lease.py` keeps leases alive; `tests/contract/test_kv_contract.py` holds both to the
same behaviour.

Revisions: the store has one revision counter. Every write (a put, a delete that removed
something, a transaction with writes, a lease expiring with keys attached) increments it once;
every key records the revision that created it (`create_revision`), the one that last changed it
(`mod_revision`) and its `version` (1 when created, one more per write since). A key created
again after a delete gets a new `create_revision`, which is what election fencing relies on.

Reading then watching without missing anything: `get_prefix` returns the revision it read at; a
watch started at that revision + 1 delivers every change after the read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from gemini_ckpt.errors import CoordinationError, CoordinationUnavailableError

CompareTarget = Literal["value", "version", "create_revision", "mod_revision", "lease"]
CompareOp = Literal["==", "!=", "<", ">"]


@dataclass(frozen=True)
class KeyValue:
    """A key's value and metadata as of some revision. `lease` is 0 when none is attached."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclass(frozen=True)
class Range:
    """The result of a prefix read: the matching keys in key order, and the revision read at."""

    items: tuple[KeyValue, ...]
    revision: int


@dataclass(frozen=True)
class Lease:
    """A granted lease: its id (put it on keys) and the TTL the server granted, in seconds."""

    id: int
    ttl_s: int


@dataclass(frozen=True)
class WatchEvent:
    """One change under a watched prefix.

    `kind` is "put" or "delete"; `revision` is the revision of the change. For a delete, `value`
    is empty and `create_revision`/`version` are 0.
    """

    kind: Literal["put", "delete"]
    key: str
    value: bytes
    revision: int
    create_revision: int = 0
    version: int = 0
    lease: int = 0


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction: `target(key) op operand`.

    A missing key has version, create_revision, mod_revision and lease 0, and a comparison on its
    value is always false (etcd's rule: there is no value to compare). Use the constructors.
    """

    key: str
    target: CompareTarget
    op: CompareOp
    operand: bytes | int

    @classmethod
    def value(cls, key: str, op: CompareOp, value: bytes) -> Compare:
        """Compare the key's value (bytes, lexicographic)."""
        return cls(key, "value", op, value)

    @classmethod
    def version(cls, key: str, op: CompareOp, version: int) -> Compare:
        """Compare the key's version (1 when created, one more per write; 0: absent)."""
        return cls(key, "version", op, version)

    @classmethod
    def create_revision(cls, key: str, op: CompareOp, revision: int) -> Compare:
        """Compare the revision that created the key (0: absent)."""
        return cls(key, "create_revision", op, revision)

    @classmethod
    def mod_revision(cls, key: str, op: CompareOp, revision: int) -> Compare:
        """Compare the revision that last changed the key (0: absent)."""
        return cls(key, "mod_revision", op, revision)

    @classmethod
    def lease(cls, key: str, op: CompareOp, lease_id: int) -> Compare:
        """Compare the lease attached to the key (0: none, or absent)."""
        return cls(key, "lease", op, lease_id)

    @classmethod
    def absent(cls, key: str) -> Compare:
        """The key does not exist."""
        return cls(key, "create_revision", "==", 0)

    @classmethod
    def exists(cls, key: str) -> Compare:
        """The key exists."""
        return cls(key, "create_revision", ">", 0)

    def holds(self, kv: KeyValue | None) -> bool:
        """Evaluate this condition against the key's current state (None: absent)."""
        if self.target == "value":
            if kv is None:
                return False
            mine: bytes | int = kv.value
        else:
            name = "lease" if self.target == "lease" else self.target
            mine = 0 if kv is None else int(getattr(kv, name))
        other = self.operand
        if isinstance(mine, bytes) != isinstance(other, bytes):
            return False
        if self.op == "==":
            return mine == other
        if self.op == "!=":
            return mine != other
        if self.op == "<":
            return mine < other  # type: ignore[operator]
        return mine > other  # type: ignore[operator]


@dataclass(frozen=True)
class Put:
    """Transaction operation: create or overwrite `key`, attached to `lease` (0: none)."""

    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    """Transaction operation: remove `key`, or every key starting with it if `prefix`."""

    key: str
    prefix: bool = False


@dataclass(frozen=True)
class Get:
    """Transaction operation: read `key`; its result lands in `TxnResult.reads`."""

    key: str


Op = Put | Delete | Get


@dataclass(frozen=True)
class TxnResult:
    """Whether the compares held, the revision after the transaction, and the branch's reads.

    `reads` has one entry per `Get` of the branch that ran, in order (None: absent).
    """

    succeeded: bool
    revision: int
    reads: tuple[KeyValue | None, ...] = ()


WatchCallback = Callable[[WatchEvent], None]
ErrorCallback = Callable[[Exception], None]


class Watch(Protocol):
    """A running watch, returned established by `ControlKV.watch_prefix`."""

    def cancel(self, timeout_s: float = 5.0) -> None:
        """Stop delivering events and join the delivery thread (idempotent).

        May be called from the callback itself; then it does not wait for its own thread.
        """

    def __enter__(self) -> Watch: ...

    def __exit__(self, *exc: object) -> None: ...


class ControlKV(Protocol):
    """A KV with revisions, leases, transactions and watches (etcd v3 semantics).

    A superset of `kv.KV`: the six calls of `KV` keep their meaning, with `add` and `compare_set`
    run as transactions. Every call is atomic on its own and takes `timeout_s` (None: the
    implementation's default). Unless a call says otherwise, it raises
    `CoordinationUnavailableError` when no endpoint answered in time, and is safe to retry: the
    etcd implementation retries reads, puts, deletes and lease calls on the next endpoint within
    the timeout by itself, so an outage shorter than the timeout is invisible to callers.

    Call order: a started implementation (`EtcdKV.start()`; `MemoryKV` needs none), any calls
    from any threads, then `close()`.
    """

    def get(self, key: str, *, timeout_s: float | None = None) -> bytes | None:
        """The value of `key`, or None if it does not exist."""

    def set(self, key: str, value: bytes, *, timeout_s: float | None = None) -> None:
        """Create or overwrite `key` (no lease)."""

    def add(self, key: str, delta: int, *, timeout_s: float | None = None) -> int:
        """Add `delta` to the integer at `key` (0 if absent) and return the result.

        A compare-and-swap loop: not retried once sent (see `txn`), so an outage may leave the
        addition applied or not, and raise `CoordinationUnavailableError`.
        """

    def compare_set(
        self, key: str, expected: bytes | None, desired: bytes, *, timeout_s: float | None = None
    ) -> bool:
        """Set `key` to `desired` iff its value is `expected` (None: absent); True on success.

        One transaction; see `txn` for what an outage means.
        """

    def delete(self, key: str, *, timeout_s: float | None = None) -> None:
        """Remove `key` if present (idempotent)."""

    def close(self) -> None:
        """Cancel this client's watches and release its connections (idempotent)."""

    def get_kv(self, key: str, *, timeout_s: float | None = None) -> KeyValue | None:
        """The key with its metadata, or None if absent."""

    def get_prefix(self, prefix: str, *, timeout_s: float | None = None) -> Range:
        """Every key starting with `prefix`, in key order, and the revision they were read at."""

    def put(self, key: str, value: bytes, *, lease: int = 0, timeout_s: float | None = None) -> int:
        """Create or overwrite `key`, attached to `lease` (0: none); returns the new revision.

        Retried across endpoints, so after an outage the same put may land twice (two
        revisions, same value).

        Raises:
            LeaseLostError: `lease` does not exist (expired or revoked); nothing was written.
        """

    def delete_prefix(self, prefix: str, *, timeout_s: float | None = None) -> int:
        """Remove every key starting with `prefix` in one revision; returns how many went."""

    def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
        *,
        timeout_s: float | None = None,
    ) -> TxnResult:
        """If every compare holds, run `success`, otherwise `failure`, all at one revision.

        Operations run in order and later ones see earlier ones' writes; a key may be written
        at most once per branch. Retried on another endpoint only while it cannot have reached
        a server; once sent, a lost connection raises `CoordinationUnavailableError` and the
        transaction may or may not have been applied: compare-guarded callers re-read and decide
        again.

        Raises:
            LeaseLostError: a `Put` names a lease that does not exist (nothing was applied).
        """

    def grant_lease(self, ttl_s: int, *, timeout_s: float | None = None) -> Lease:
        """Grant a lease of `ttl_s` seconds (>= 1). It expires unless refreshed within its TTL.

        Keep it alive with `LeaseKeeper` (or `refresh_lease`); a retried grant may leave an
        unused lease behind, which expires by itself.
        """

    def refresh_lease(self, lease_id: int, *, timeout_s: float | None = None) -> int:
        """Restart the lease's TTL; returns the TTL granted again, in seconds.

        Raises:
            LeaseLostError: the lease expired or was revoked.
        """

    def revoke_lease(self, lease_id: int, *, timeout_s: float | None = None) -> None:
        """End the lease now and delete its keys (idempotent: an unknown lease is fine)."""

    def watch_prefix(
        self,
        prefix: str,
        callback: WatchCallback,
        *,
        start_revision: int,
        on_error: ErrorCallback | None = None,
        timeout_s: float | None = None,
    ) -> Watch:
        """Deliver every change under `prefix` with revision >= `start_revision`, in order.

        `start_revision` 0 means "changes after now"; to miss nothing after a read, pass the
        read's revision + 1. `callback` runs on the watch's own named thread, one event at a
        time, in revision order; a callback that raises is logged and the watch goes on. Returns
        once the watch is established, so every change made after the call returns is
        delivered. If the history from `start_revision` is gone (compacted), or the watch
        cannot go on, `on_error` is called once with a `CoordinationError`, after the events
        delivered before, and no further events come. The etcd implementation re-establishes a
        broken stream on the next endpoint by itself, from the revision after its last event.

        Raises:
            CoordinationUnavailableError: no endpoint accepted the watch within `timeout_s`.
        """


def txn_add(kv: ControlKV, key: str, delta: int, timeout_s: float) -> int:
    """`KV.add` as compare-and-swap transactions on `kv`, retried until `timeout_s` passes.

    Raises:
        CoordinationError: the value at `key` is not an integer, or the swap kept losing races.
    """
    deadline = time.monotonic() + timeout_s
    current = kv.get_kv(key, timeout_s=timeout_s)
    while True:
        raw = current.value if current is not None else b"0"
        try:
            value = int(raw) + delta
        except ValueError as e:
            raise CoordinationError(f"{key} holds {raw!r}, not an integer") from e
        mod = current.mod_revision if current is not None else 0
        remaining = max(deadline - time.monotonic(), 0.001)
        result = kv.txn(
            [Compare.mod_revision(key, "==", mod)],
            [Put(key, str(value).encode())],
            [Get(key)],
            timeout_s=remaining,
        )
        if result.succeeded:
            return value
        if time.monotonic() >= deadline:
            raise CoordinationUnavailableError(f"adding to {key} lost every race for {timeout_s} s")
        current = result.reads[0]


def txn_compare_set(
    kv: ControlKV, key: str, expected: bytes | None, desired: bytes, timeout_s: float
) -> bool:
    """`KV.compare_set` as one transaction on `kv`."""
    guard = Compare.absent(key) if expected is None else Compare.value(key, "==", expected)
    return kv.txn([guard], [Put(key, desired)], timeout_s=timeout_s).succeeded
