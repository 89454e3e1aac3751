"""MemoryKV's own behaviour (fake clock, compaction), and the helpers shared by every ControlKV:
compare evaluation, watch delivery, and the lease keeper."""

from __future__ import annotations

import threading
import time

import pytest

from gemini_ckpt.coordination.control_kv import Compare, KeyValue, Lease, Put, WatchEvent
from gemini_ckpt.coordination.kv import MemoryKV
from gemini_ckpt.coordination.lease import LeaseKeeper
from gemini_ckpt.coordination.watch import EventDispatcher, EventQueue
from gemini_ckpt.errors import CoordinationError, CoordinationUnavailableError, LeaseLostError


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def kv(clock):
    store = MemoryKV(clock=clock)
    yield store
    store.close()


def test_compare_holds_is_etcd_semantics():
    kv = KeyValue("k", b"b", create_revision=3, mod_revision=5, version=2, lease=7)
    assert Compare.value("k", "==", b"b").holds(kv)
    assert Compare.value("k", "<", b"c").holds(kv)
    assert Compare.create_revision("k", "==", 3).holds(kv)
    assert Compare.mod_revision("k", ">", 4).holds(kv)
    assert Compare.lease("k", "==", 7).holds(kv)
    assert not Compare.version("k", "!=", 2).holds(kv)
    assert Compare.absent("k").holds(None)
    assert not Compare.value("k", "!=", b"x").holds(None)
    assert not Compare("k", "version", "==", b"2").holds(kv)  # wrong operand type never holds


def test_leases_expire_only_when_the_clock_says_so(kv, clock):
    lease = kv.grant_lease(3)
    kv.put("m/a", b"1", lease=lease.id)
    clock.now += 2.9
    assert kv.expire_leases() == 0
    assert kv.get("m/a") == b"1"
    kv.refresh_lease(lease.id)
    clock.now += 2.9
    assert kv.get("m/a") == b"1"
    clock.now += 0.1
    assert kv.get("m/a") is None  # expiry is applied by any call, not only expire_leases()
    with pytest.raises(LeaseLostError):
        kv.refresh_lease(lease.id)


def test_one_revision_per_expired_lease(kv, clock):
    lease = kv.grant_lease(1)
    kv.put("e/a", b"1", lease=lease.id)
    kv.put("e/b", b"1", lease=lease.id)
    events = EventQueue()
    with kv.watch_prefix("e/", events.put, start_revision=0):
        clock.now += 1
        assert kv.expire_leases() == 1
        got = [events.get(2), events.get(2)]
    assert [(e.kind, e.key) for e in got] == [("delete", "e/a"), ("delete", "e/b")]
    assert got[0].revision == got[1].revision


def test_overwriting_a_leased_key_detaches_it(kv, clock):
    lease = kv.grant_lease(1)
    kv.put("d/a", b"1", lease=lease.id)
    kv.put("d/a", b"2")
    clock.now += 2
    assert kv.get("d/a") == b"2"


def test_watch_before_the_kept_history_fails_through_on_error():
    kv = MemoryKV(history=3)
    for i in range(5):
        kv.put(f"h/{i}", b"1")
    errors: list[Exception] = []
    done = threading.Event()

    def on_error(e: Exception) -> None:
        errors.append(e)
        done.set()

    kv.watch_prefix("h/", lambda e: None, start_revision=2, on_error=on_error)
    assert done.wait(2)
    assert isinstance(errors[0], CoordinationError)
    assert "history" in str(errors[0])
    events = EventQueue()
    with kv.watch_prefix("h/", events.put, start_revision=5):  # still kept
        assert [events.get(2).key for _ in range(2)] == ["h/3", "h/4"]
    kv.close()


def test_add_refuses_a_non_integer(kv):
    kv.set("n", b"abc")
    with pytest.raises(CoordinationError, match="not an integer"):
        kv.add("n", 1)


def test_dispatcher_delivers_in_order_then_the_error_and_stops():
    seen: list[object] = []
    done = threading.Event()
    dispatcher = EventDispatcher(
        "gemini-watch-test", seen.append, lambda e: (seen.append(e), done.set())
    )
    for i in range(3):
        dispatcher.push(WatchEvent("put", f"k{i}", b"", i + 1))
    dispatcher.fail(CoordinationError("gone"))
    dispatcher.push(WatchEvent("put", "late", b"", 9))
    dispatcher.start()
    assert done.wait(2)
    dispatcher.cancel()
    assert [getattr(x, "key", str(x)) for x in seen] == ["k0", "k1", "k2", "gone"]
    assert dispatcher.cancelled


def test_cancel_from_inside_the_callback_does_not_deadlock(kv):
    holder: dict[str, object] = {}
    done = threading.Event()

    def callback(event: WatchEvent) -> None:
        holder["watch"].cancel()  # type: ignore[attr-defined]
        done.set()

    holder["watch"] = kv.watch_prefix("self/", callback, start_revision=0)
    kv.put("self/a", b"1")
    assert done.wait(2)


# -- LeaseKeeper -------------------------------------------------------------------------------


def test_keeper_keeps_the_lease_and_revokes_on_close():
    kv = MemoryKV()
    lease = kv.grant_lease(1)
    kv.put("k/a", b"1", lease=lease.id)
    with LeaseKeeper(kv, lease) as keeper:
        time.sleep(1.2)  # longer than the TTL: only refreshes keep the key
        assert kv.get("k/a") == b"1"
        assert keeper.lost is None
        assert threading.current_thread().name != f"gemini-lease-{lease.id:x}"
        assert any(t.name == f"gemini-lease-{lease.id:x}" for t in threading.enumerate())
    assert kv.get("k/a") is None
    assert not any(t.name == f"gemini-lease-{lease.id:x}" for t in threading.enumerate())


def test_keeper_reports_a_lease_revoked_elsewhere():
    kv = MemoryKV()
    lease = kv.grant_lease(1)
    reasons: list[str] = []
    keeper = LeaseKeeper(kv, lease, on_lost=reasons.append).start()
    kv.revoke_lease(lease.id)
    assert keeper.wait_lost(2) is not None
    assert reasons and "expired or was revoked" in reasons[0]
    keeper.close()


class _Unreachable:
    """A ControlKV stand-in whose server never answers."""

    def refresh_lease(self, lease_id: int, *, timeout_s: float | None = None) -> int:
        raise CoordinationUnavailableError("no endpoint answered")

    def revoke_lease(self, lease_id: int, *, timeout_s: float | None = None) -> None:
        raise CoordinationUnavailableError("no endpoint answered")


def test_keeper_gives_up_after_a_ttl_without_a_server(clock):
    keeper = LeaseKeeper(_Unreachable(), Lease(5, 1), clock=clock).start()  # type: ignore[arg-type]
    assert keeper.wait_lost(0.3) is None  # retries while the TTL has not run out
    clock.now += 1.0
    reason = keeper.wait_lost(2)
    assert reason is not None and "not refreshed within 1 s" in reason
    keeper.close()  # the revoke fails too; close still returns


def test_concurrent_transactions_serialise(kv):
    wins: list[int] = []

    def contend(i: int) -> None:
        if kv.txn([Compare.absent("once")], [Put("once", str(i).encode())]).succeeded:
            wins.append(i)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len(wins) == 1
    assert kv.get("once") == str(wins[0]).encode()
