"""One contract per KV interface, run against every implementation.

`KV` (what the job coordinator uses): the in-memory store, torch's TCPStore and etcd.
`ControlKV` (what the control plane uses): the in-memory store and a real etcd server, started once
per session on free loopback ports (skipped only if the `etcd` binary is missing).
"""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from gemini_ckpt.config import EtcdClientConfig
from gemini_ckpt.coordination.control_kv import Compare, Delete, Get, Put
from gemini_ckpt.coordination.etcd_kv import EtcdKV
from gemini_ckpt.coordination.etcd_server import EtcdServer, free_ports
from gemini_ckpt.coordination.kv import MemoryKV, TCPStoreKV
from gemini_ckpt.coordination.watch import EventQueue
from gemini_ckpt.errors import CoordinationError, CoordinationUnavailableError, LeaseLostError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="session")
def etcd_server():
    if shutil.which("etcd") is None:
        pytest.skip("the etcd binary is missing (Debian package etcd-server)")
    with EtcdServer() as server:
        yield server


@pytest.fixture
def etcd_kv(etcd_server):
    kv = EtcdKV(EtcdClientConfig(etcd_server.endpoints, request_timeout_s=5)).start()
    kv.delete_prefix("")
    yield kv
    kv.close()


@pytest.fixture(params=["memory", "tcpstore", "etcd"])
def kv(request):
    if request.param == "memory":
        yield MemoryKV()
    elif request.param == "tcpstore":
        server = TCPStoreKV.host("127.0.0.1", 0)
        yield TCPStoreKV.connect("127.0.0.1", server.port, timeout_s=5)
    else:
        yield request.getfixturevalue("etcd_kv")


class Harness:
    """A ControlKV plus a way to let time pass for its leases."""

    def __init__(self, kv, clock: FakeClock | None) -> None:
        self.kv = kv
        self.clock = clock

    def let_pass(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.now += seconds
            self.kv.expire_leases()
        else:
            time.sleep(seconds)


@pytest.fixture(params=["memory", "etcd"])
def h(request):
    if request.param == "memory":
        clock = FakeClock()
        kv = MemoryKV(clock=clock)
        yield Harness(kv, clock)
        kv.close()
    else:
        yield Harness(request.getfixturevalue("etcd_kv"), None)


# -- KV ------------------------------------------------------------------------------------------


def test_get_set_delete(kv):
    assert kv.get("a") is None
    kv.set("a", b"1")
    assert kv.get("a") == b"1"
    kv.set("a", b"2")
    assert kv.get("a") == b"2"
    kv.delete("a")
    assert kv.get("a") is None
    kv.delete("a")  # idempotent


def test_add_is_a_counter(kv):
    assert kv.add("n", 1) == 1
    assert kv.add("n", 2) == 3
    assert kv.get("n") == b"3"


def test_compare_set(kv):
    assert kv.compare_set("g", None, b"0")
    assert not kv.compare_set("g", None, b"5")
    assert kv.compare_set("g", b"0", b"1")
    assert not kv.compare_set("g", b"0", b"2")
    assert kv.get("g") == b"1"


def test_unreachable_store_is_a_clear_error():
    server = TCPStoreKV.host("127.0.0.1", 0)
    port = server.port
    del server
    with pytest.raises(CoordinationError, match=f"cannot reach the job store at 127.0.0.1:{port}"):
        TCPStoreKV.connect("127.0.0.1", port, timeout_s=0.5)


# -- ControlKV: metadata and ranges --------------------------------------------------------------


def test_metadata_follows_revisions(h):
    kv = h.kv
    first = kv.put("m/a", b"1")
    second = kv.put("m/a", b"2")
    assert second == first + 1
    item = kv.get_kv("m/a")
    assert (item.value, item.create_revision, item.mod_revision, item.version, item.lease) == (
        b"2",
        first,
        second,
        2,
        0,
    )
    kv.delete("m/a")
    assert kv.get_kv("m/a") is None
    third = kv.put("m/a", b"3")
    recreated = kv.get_kv("m/a")
    assert recreated.create_revision == third > second
    assert recreated.version == 1


def test_get_prefix_in_key_order_with_its_revision(h):
    kv = h.kv
    for key in ("p/b", "p/a", "p/c/d", "q/a", "p"):
        kv.put(key, key.encode())
    result = kv.get_prefix("p/")
    assert [item.key for item in result.items] == ["p/a", "p/b", "p/c/d"]
    assert result.revision == max(item.mod_revision for item in kv.get_prefix("").items)
    assert kv.get_prefix("nothing/").items == ()


def test_delete_prefix_counts_and_spares_neighbours(h):
    kv = h.kv
    for key in ("d/1", "d/2", "e/1"):
        kv.put(key, b"x")
    assert kv.delete_prefix("d/") == 2
    assert kv.delete_prefix("d/") == 0
    assert [item.key for item in kv.get_prefix("").items] == ["e/1"]


# -- ControlKV: transactions ---------------------------------------------------------------------


def test_txn_runs_one_branch_at_one_revision(h):
    kv = h.kv
    kv.put("t/a", b"1")
    ok = kv.txn(
        [Compare.value("t/a", "==", b"1")],
        [Put("t/b", b"2"), Put("t/c", b"3"), Get("t/b")],
        [Put("t/failed", b"1")],
    )
    assert ok.succeeded
    assert ok.reads[0].value == b"2"
    b, c = kv.get_kv("t/b"), kv.get_kv("t/c")
    assert b.mod_revision == c.mod_revision == ok.revision
    failed = kv.txn([Compare.value("t/a", "==", b"9")], [Put("t/b", b"x")], [Get("t/zzz")])
    assert not failed.succeeded
    assert failed.reads == (None,)
    assert failed.revision == ok.revision  # no write, no new revision
    assert kv.get("t/b") == b"2"


@pytest.mark.parametrize(
    ("compare", "holds"),
    [
        (Compare.value("c/k", "==", b"v"), True),
        (Compare.value("c/k", "!=", b"v"), False),
        (Compare.value("c/k", ">", b"a"), True),
        (Compare.value("c/k", "<", b"a"), False),
        (Compare.version("c/k", "==", 2), True),
        (Compare.version("c/k", ">", 2), False),
        (Compare.exists("c/k"), True),
        (Compare.absent("c/k"), False),
        (Compare.absent("c/missing"), True),
        (Compare.exists("c/missing"), False),
        (Compare.version("c/missing", "==", 0), True),
        (Compare.mod_revision("c/missing", "==", 0), True),
        (Compare.lease("c/k", "==", 0), True),
        # etcd's rule: a value comparison on a missing key is always false.
        (Compare.value("c/missing", "==", b""), False),
        (Compare.value("c/missing", "!=", b"v"), False),
    ],
)
def test_compares(h, compare, holds):
    h.kv.put("c/k", b"x")
    h.kv.put("c/k", b"v")
    assert h.kv.txn([compare], [Put("c/out", b"1")]).succeeded is holds


def test_compare_on_revisions_is_a_fence(h):
    kv = h.kv
    kv.put("f/k", b"1")
    item = kv.get_kv("f/k")
    guard = [
        Compare.create_revision("f/k", "==", item.create_revision),
        Compare.mod_revision("f/k", "==", item.mod_revision),
    ]
    assert kv.txn(guard, [Put("f/w", b"1")]).succeeded
    kv.put("f/k", b"2")
    assert not kv.txn(guard, [Put("f/w", b"2")]).succeeded
    assert kv.get("f/w") == b"1"


def test_delete_ops_in_txn(h):
    kv = h.kv
    for key in ("x/1", "x/2", "y"):
        kv.put(key, b"1")
    result = kv.txn([], [Delete("x/", prefix=True), Delete("y"), Delete("absent")])
    assert result.succeeded
    assert kv.get_prefix("").items == ()


def test_txn_with_a_missing_lease_applies_nothing(h):
    kv = h.kv
    lease = kv.grant_lease(5)
    kv.revoke_lease(lease.id)
    with pytest.raises(LeaseLostError):
        kv.txn([], [Put("l/a", b"1"), Put("l/b", b"1", lease=lease.id)])
    assert kv.get("l/a") is None


# -- ControlKV: leases ---------------------------------------------------------------------------


def test_lease_keys_go_with_the_lease(h):
    kv = h.kv
    lease = kv.grant_lease(5)
    assert lease.ttl_s == 5
    kv.put("lease/a", b"1", lease=lease.id)
    kv.put("lease/b", b"1", lease=lease.id)
    kv.put("lease/c", b"1")
    assert kv.get_kv("lease/a").lease == lease.id
    assert kv.refresh_lease(lease.id) == 5
    kv.revoke_lease(lease.id)
    assert [item.key for item in kv.get_prefix("lease/").items] == ["lease/c"]
    kv.revoke_lease(lease.id)  # idempotent
    with pytest.raises(LeaseLostError):
        kv.refresh_lease(lease.id)
    with pytest.raises(LeaseLostError):
        kv.put("lease/d", b"1", lease=lease.id)


def test_lease_expires_unless_refreshed(h):
    kv = h.kv
    lease = kv.grant_lease(1)
    kv.put("exp/k", b"1", lease=lease.id)
    h.let_pass(0.6)
    kv.refresh_lease(lease.id)
    h.let_pass(0.6)
    assert kv.get("exp/k") == b"1"  # 1.2 s after the grant, 0.6 s after the refresh
    deadline = time.monotonic() + 3
    while kv.get("exp/k") is not None and time.monotonic() < deadline:
        h.let_pass(0.25)
    assert kv.get("exp/k") is None
    with pytest.raises(LeaseLostError):
        kv.refresh_lease(lease.id)


def test_a_lease_ttl_below_one_second_is_refused(h):
    with pytest.raises(CoordinationError, match="TTL"):
        h.kv.grant_lease(0)


# -- ControlKV: watches --------------------------------------------------------------------------


def test_watch_from_a_read_misses_nothing(h):
    kv = h.kv
    kv.put("w/a", b"0")
    snapshot = kv.get_prefix("w/")
    kv.put("w/a", b"1")  # between the read and the watch
    events = EventQueue()
    with kv.watch_prefix("w/", events.put, start_revision=snapshot.revision + 1):
        kv.put("other/x", b"1")
        kv.txn([], [Put("w/b", b"2"), Put("w/c", b"3")])
        kv.delete("w/a")
        got = [events.get(5) for _ in range(4)]
    assert [(e.kind, e.key, e.value) for e in got] == [
        ("put", "w/a", b"1"),
        ("put", "w/b", b"2"),
        ("put", "w/c", b"3"),
        ("delete", "w/a", b""),
    ]
    assert got[1].revision == got[2].revision < got[3].revision
    assert got[0].version == 2
    assert events.get(0.05) is None


def test_watch_from_now_and_cancel(h):
    kv = h.kv
    kv.put("n/old", b"1")
    events = EventQueue()
    watch = kv.watch_prefix("n/", events.put, start_revision=0)
    kv.put("n/new", b"1")
    assert events.get(5).key == "n/new"
    watch.cancel()
    watch.cancel()  # idempotent
    kv.put("n/after", b"1")
    assert events.get(0.1) is None
    assert not [t for t in threading.enumerate() if t.name.endswith("-n/")]


def test_watch_callback_runs_on_a_named_thread_and_survives_errors(h):
    kv = h.kv
    seen = []

    def callback(event):
        seen.append((event.key, threading.current_thread().name))
        if event.key == "cb/1":
            raise RuntimeError("callback bug")

    with kv.watch_prefix("cb/", callback, start_revision=0):
        kv.put("cb/1", b"1")
        kv.put("cb/2", b"1")
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert [key for key, _ in seen] == ["cb/1", "cb/2"]
    assert all(name == "gemini-watch-cb/" for _, name in seen)


def test_watch_sees_lease_expiry_as_deletes(h):
    kv = h.kv
    lease = kv.grant_lease(1)
    kv.put("le/a", b"1", lease=lease.id)
    events = EventQueue()
    with kv.watch_prefix("le/", events.put, start_revision=0):
        deadline = time.monotonic() + 4
        event = None
        while event is None and time.monotonic() < deadline:
            h.let_pass(0.25)
            event = events.get(0.05)
    assert (event.kind, event.key) == ("delete", "le/a")


def test_close_cancels_watches(h):
    kv = h.kv
    kv.watch_prefix("close/", lambda e: None, start_revision=0)
    kv.close()
    assert not [t for t in threading.enumerate() if "close/" in t.name]


def test_concurrent_adds_are_exact(h):
    def work():
        for _ in range(20):
            h.kv.add("counter", 1, timeout_s=10)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert h.kv.get("counter") == b"80"


# -- etcd specifics ------------------------------------------------------------------------------


def test_unreachable_etcd_is_a_clear_error_within_seconds():
    (port,) = free_ports("127.0.0.1", 1)
    config = EtcdClientConfig((f"127.0.0.1:{port}", "localhost:1"), connect_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(CoordinationUnavailableError, match=f"127.0.0.1:{port},localhost:1"):
        EtcdKV(config).start()
    assert time.monotonic() - started < 3
