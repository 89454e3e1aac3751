"""`ControlKV` over an etcd v3 cluster, through gRPC (the only module that imports an etcd client).

We use the v3 API messages and stubs that `etcd-sdk-python` generates (`pyetcd.etcdrpc`) over
our own gRPC channels, one per endpoint, and not its high-level client: that one has a single
timeout per client, switches endpoints without a lock, and runs watches on a thread we cannot
join. See docs/decisions/0004-etcd-client.md for the choice and the measurements.

Failover: calls go to the current endpoint; when it fails they move to the next. Reads, puts,
deletes and lease calls are retried on the next endpoint until their timeout runs out. A
transaction is retried only while it cannot have reached a server (the endpoint did not accept a
connection); once sent, a lost connection raises `CoordinationUnavailableError` and its outcome is
unknown. Watches re-establish themselves on the next endpoint from the revision after the last
event they delivered, and require a member that has a leader, so a member cut off from the
others hands its watchers over.

Processes: create the client in the process that uses it. A child started with fork+exec
(`subprocess`, torch's `start_processes`) is safe while calls and watches run; a child of a bare
`fork()` must not use its parent's client.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any

import grpc
from pyetcd import etcdrpc

from gemini_ckpt.config import EtcdClientConfig
from gemini_ckpt.coordination.control_kv import (
    Compare,
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
from gemini_ckpt.coordination.etcd_transport import Endpoint, EndpointPool, ResumableWatch
from gemini_ckpt.coordination.watch import EventDispatcher
from gemini_ckpt.errors import CoordinationError, CoordinationUnavailableError, LeaseLostError

_TARGETS = {
    "value": etcdrpc.Compare.VALUE,
    "version": etcdrpc.Compare.VERSION,
    "create_revision": etcdrpc.Compare.CREATE,
    "mod_revision": etcdrpc.Compare.MOD,
    "lease": etcdrpc.Compare.LEASE,
}
_OPS = {
    "==": etcdrpc.Compare.EQUAL,
    "!=": etcdrpc.Compare.NOT_EQUAL,
    "<": etcdrpc.Compare.LESS,
    ">": etcdrpc.Compare.GREATER,
}


def _b(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def _s(key: bytes) -> str:
    return key.decode("utf-8", "surrogateescape")


def prefix_range(prefix: str) -> tuple[bytes, bytes]:
    """The etcd key range `[key, range_end)` of every key starting with `prefix` ("": all)."""
    start = _b(prefix)
    end = bytearray(start)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return start or b"\0", b"\0"  # to the end of the key space
    end[-1] += 1
    return start, bytes(end)


def _range_fields(prefix: str) -> dict[str, bytes]:
    key, end = prefix_range(prefix)
    return {"key": key, "range_end": end}


def _to_kv(pb: Any) -> KeyValue:
    return KeyValue(
        _s(pb.key), bytes(pb.value), pb.create_revision, pb.mod_revision, pb.version, pb.lease
    )


def _to_event(pb: Any) -> WatchEvent:
    kv = pb.kv
    if pb.type == pb.DELETE:
        return WatchEvent("delete", _s(kv.key), b"", int(kv.mod_revision))
    return WatchEvent(
        "put",
        _s(kv.key),
        bytes(kv.value),
        kv.mod_revision,
        kv.create_revision,
        kv.version,
        kv.lease,
    )


def _compare(c: Compare) -> Any:
    field = "lease" if c.target == "lease" else c.target
    return etcdrpc.Compare(
        key=_b(c.key), target=_TARGETS[c.target], result=_OPS[c.op], **{field: c.operand}
    )


def _request(op: Op) -> Any:
    if isinstance(op, Put):
        return etcdrpc.RequestOp(
            request_put=etcdrpc.PutRequest(key=_b(op.key), value=op.value, lease=op.lease)
        )
    if isinstance(op, Get):
        return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=_b(op.key)))
    key, end = prefix_range(op.key) if op.prefix else (_b(op.key), b"")
    return etcdrpc.RequestOp(
        request_delete_range=etcdrpc.DeleteRangeRequest(key=key, range_end=end)
    )


class _Stubs:
    """The etcd v3 services on one channel."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.kv = etcdrpc.KVStub(channel)
        self.lease = etcdrpc.LeaseStub(channel)
        self.watch = etcdrpc.WatchStub(channel)


def raft_leader(endpoints: Sequence[str], timeout_s: float = 2.0) -> int | None:
    """Index in `endpoints` of the raft leader, None if none says it leads (faults, tests)."""
    for index, endpoint in enumerate(endpoints):
        with grpc.insecure_channel(endpoint) as channel:
            stub = etcdrpc.MaintenanceStub(channel)
            with contextlib.suppress(grpc.RpcError):
                status = stub.Status(etcdrpc.StatusRequest(), timeout=timeout_s)
                if status.leader and status.leader == status.header.member_id:
                    return index
    return None


_PROBE = etcdrpc.RangeRequest(key=b"gemini/health", count_only=True)


def _probe(endpoint: Endpoint, timeout_s: float) -> object:
    """A linearizable read: it answers only on a member that has a leader.

    Fail-fast (gRPC's default, no wait-for-ready): a channel that is not connected yet connects
    first, but one whose member refuses connections fails at once instead of waiting out the
    timeout for the member to come back.
    """
    return endpoint.stubs.kv.Range(_PROBE, timeout=timeout_s)


class EtcdKV:
    """`ControlKV` on etcd; thread-safe. Call order: `start()`, calls, `close()`."""

    def __init__(self, config: EtcdClientConfig) -> None:
        self.config = config
        self._pool = EndpointPool(config)
        self._watches: set[_EtcdWatch] = set()
        self._lock = threading.Lock()

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The endpoints this client uses, as configured."""
        return self.config.endpoints

    def start(self, check: bool = True) -> EtcdKV:
        """Open channels and, if `check`, wait until one endpoint serves a read; returns self.

        Raises:
            CoordinationUnavailableError: `check` and no endpoint answered within the configured
                `connect_timeout_s`; the message names the endpoints.
        """
        self._pool.open(_Stubs, _probe)
        if check:
            try:
                self.get("gemini/health", timeout_s=self.config.connect_timeout_s)
            except CoordinationError as e:
                self.close()
                raise CoordinationUnavailableError(
                    f"cannot reach etcd at {','.join(self.endpoints)} within "
                    f"{self.config.connect_timeout_s:g} s: {e}"
                ) from e
        return self

    def close(self) -> None:
        """Cancel every watch and close the channels (idempotent)."""
        with self._lock:
            watches, self._watches = list(self._watches), set()
        for watch in watches:
            watch.cancel()
        self._pool.close()

    def __enter__(self) -> EtcdKV:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- KV ------------------------------------------------------------------------------------

    def get(self, key: str, *, timeout_s: float | None = None) -> bytes | None:
        """See `ControlKV.get`."""
        kv = self.get_kv(key, timeout_s=timeout_s)
        return None if kv is None else kv.value

    def set(self, key: str, value: bytes, *, timeout_s: float | None = None) -> None:
        """See `ControlKV.set`."""
        self.put(key, value, timeout_s=timeout_s)

    def add(self, key: str, delta: int, *, timeout_s: float | None = None) -> int:
        """See `ControlKV.add`."""
        return txn_add(self, key, delta, timeout_s or self.config.request_timeout_s)

    def compare_set(
        self, key: str, expected: bytes | None, desired: bytes, *, timeout_s: float | None = None
    ) -> bool:
        """See `ControlKV.compare_set`."""
        timeout = timeout_s or self.config.request_timeout_s
        return txn_compare_set(self, key, expected, desired, timeout)

    def delete(self, key: str, *, timeout_s: float | None = None) -> None:
        """See `ControlKV.delete`."""
        request = etcdrpc.DeleteRangeRequest(key=_b(key))
        self._pool.call(
            "delete", lambda ep, t: ep.stubs.kv.DeleteRange(request, timeout=t), timeout_s
        )

    # -- ControlKV -----------------------------------------------------------------------------

    def get_kv(self, key: str, *, timeout_s: float | None = None) -> KeyValue | None:
        """See `ControlKV.get_kv`."""
        request = etcdrpc.RangeRequest(key=_b(key))
        response = self._pool.call(
            "get", lambda ep, t: ep.stubs.kv.Range(request, timeout=t), timeout_s
        )
        return _to_kv(response.kvs[0]) if response.kvs else None

    def get_prefix(self, prefix: str, *, timeout_s: float | None = None) -> Range:
        """See `ControlKV.get_prefix`."""
        request = etcdrpc.RangeRequest(**_range_fields(prefix))
        response = self._pool.call(
            "range", lambda ep, t: ep.stubs.kv.Range(request, timeout=t), timeout_s
        )
        return Range(tuple(_to_kv(kv) for kv in response.kvs), int(response.header.revision))

    def put(self, key: str, value: bytes, *, lease: int = 0, timeout_s: float | None = None) -> int:
        """See `ControlKV.put` (retried: a put may land twice, as two revisions)."""
        request = etcdrpc.PutRequest(key=_b(key), value=value, lease=lease)
        response = self._pool.call(
            "put", lambda ep, t: ep.stubs.kv.Put(request, timeout=t), timeout_s
        )
        return int(response.header.revision)

    def delete_prefix(self, prefix: str, *, timeout_s: float | None = None) -> int:
        """See `ControlKV.delete_prefix`."""
        request = etcdrpc.DeleteRangeRequest(**_range_fields(prefix))
        response = self._pool.call(
            "delete", lambda ep, t: ep.stubs.kv.DeleteRange(request, timeout=t), timeout_s
        )
        return int(response.deleted)

    def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
        *,
        timeout_s: float | None = None,
    ) -> TxnResult:
        """See `ControlKV.txn`."""
        request = etcdrpc.TxnRequest(
            compare=[_compare(c) for c in compares],
            success=[_request(op) for op in success],
            failure=[_request(op) for op in failure],
        )
        response = self._pool.call(
            "transaction", lambda ep, t: ep.stubs.kv.Txn(request, timeout=t), timeout_s, retry=False
        )
        reads = []
        for item in response.responses:
            if item.WhichOneof("response") == "response_range":
                kvs = item.response_range.kvs
                reads.append(_to_kv(kvs[0]) if kvs else None)
        return TxnResult(bool(response.succeeded), int(response.header.revision), tuple(reads))

    def grant_lease(self, ttl_s: int, *, timeout_s: float | None = None) -> Lease:
        """See `ControlKV.grant_lease`."""
        if ttl_s < 1:
            raise CoordinationError(f"a lease TTL must be >= 1 s, got {ttl_s}")
        request = etcdrpc.LeaseGrantRequest(TTL=ttl_s)
        response = self._pool.call(
            "lease grant", lambda ep, t: ep.stubs.lease.LeaseGrant(request, timeout=t), timeout_s
        )
        if response.error:
            raise CoordinationError(f"etcd refused a lease of {ttl_s} s: {response.error}")
        return Lease(int(response.ID), int(response.TTL))

    def refresh_lease(self, lease_id: int, *, timeout_s: float | None = None) -> int:
        """See `ControlKV.refresh_lease`."""

        def keep_alive(ep: Endpoint, t: float) -> Any:
            call = ep.stubs.lease.LeaseKeepAlive(
                iter([etcdrpc.LeaseKeepAliveRequest(ID=lease_id)]), timeout=t
            )
            try:
                response = next(call, None)
            finally:
                call.cancel()
            if response is None:
                raise CoordinationError(f"etcd ended the keep-alive of lease {lease_id:x} silently")
            return response

        ttl = int(self._pool.call("lease refresh", keep_alive, timeout_s).TTL)
        if ttl <= 0:
            raise LeaseLostError(f"lease {lease_id:x} expired or was revoked")
        return ttl

    def revoke_lease(self, lease_id: int, *, timeout_s: float | None = None) -> None:
        """See `ControlKV.revoke_lease`."""
        request = etcdrpc.LeaseRevokeRequest(ID=lease_id)
        try:
            self._pool.call(
                "lease revoke",
                lambda ep, t: ep.stubs.lease.LeaseRevoke(request, timeout=t),
                timeout_s,
            )
        except LeaseLostError:
            return

    def watch_prefix(
        self,
        prefix: str,
        callback: WatchCallback,
        *,
        start_revision: int,
        on_error: ErrorCallback | None = None,
        timeout_s: float | None = None,
    ) -> Watch:
        """See `ControlKV.watch_prefix`."""
        dispatcher = EventDispatcher(f"gemini-watch-{prefix}", callback, on_error)

        def request(start_revision: int) -> Any:
            key, end = prefix_range(prefix)
            create = etcdrpc.WatchCreateRequest(
                key=key, range_end=end, start_revision=start_revision
            )
            return etcdrpc.WatchRequest(create_request=create)

        stream = ResumableWatch(
            self._pool, f"watch-{prefix}", start_revision, (request, _to_event), dispatcher
        )
        watch = _EtcdWatch(self, stream)
        with self._lock:
            if self._pool.closed:
                raise CoordinationError("the etcd client is closed")
            self._watches.add(watch)
        try:
            stream.start(timeout_s or self.config.request_timeout_s)
        except CoordinationError:
            self._forget(watch)
            raise
        return watch

    def _forget(self, watch: _EtcdWatch) -> None:
        with self._lock:
            self._watches.discard(watch)


class _EtcdWatch:
    """A watch on an `EtcdKV`; see `Watch`."""

    def __init__(self, kv: EtcdKV, stream: ResumableWatch) -> None:
        self._kv = kv
        self._stream = stream

    def cancel(self, timeout_s: float = 5.0) -> None:
        """See `Watch.cancel`."""
        self._stream.cancel(timeout_s)
        self._kv._forget(self)

    def __enter__(self) -> _EtcdWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()
