"""Leader election and fencing on MemoryKV with a fake clock: deterministic lease expiry."""

from __future__ import annotations

import threading
import time

import pytest

from gemini_ckpt.coordination.control_kv import Compare, KeyValue, Put, TxnResult
from gemini_ckpt.coordination.election import (
    Election,
    Leader,
    Leadership,
    check_fence,
    decide_campaign,
    fenced_txn,
)
from gemini_ckpt.coordination.kv import MemoryKV
from gemini_ckpt.errors import LeaseLostError, NotLeaderError

KEY = "gemini/job/root/leader"


class FakeClock:
    def __init__(self) -> None:
        self.now = 10.0

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


def _kv(value: bytes, lease: int, revision: int) -> KeyValue:
    return KeyValue(KEY, value, revision, revision, 1, lease)


# -- the pure decisions --------------------------------------------------------------------------


def test_decide_campaign_won():
    result = TxnResult(True, 7, (_kv(b"m1", 11, 7),))
    decision = decide_campaign(KEY, "m1", 11, result)
    assert decision.won == Leadership(KEY, "m1", 11, 7)
    assert decision.reason == f"m1 leads {KEY}: won, fencing revision 7"


def test_decide_campaign_recognises_its_own_earlier_try():
    result = TxnResult(False, 9, (_kv(b"m1", 11, 7),))
    decision = decide_campaign(KEY, "m1", 11, result)
    assert decision.won == Leadership(KEY, "m1", 11, 7)
    assert "already held" in decision.reason


def test_decide_campaign_waits_for_another_leader():
    decision = decide_campaign(KEY, "m2", 12, TxnResult(False, 9, (_kv(b"m1", 11, 7),)))
    assert decision.won is None
    assert decision.reason == f"m1 leads {KEY} since revision 7; waiting"


def test_decide_campaign_waits_for_its_own_previous_incarnation():
    decision = decide_campaign(KEY, "m1", 12, TxnResult(False, 9, (_kv(b"m1", 11, 7),)))
    assert decision.won is None
    assert "earlier incarnation of m1" in decision.reason


def test_check_fence():
    leadership = Leadership(KEY, "m1", 11, 7)
    assert check_fence(leadership, _kv(b"m1", 11, 7)) is None
    assert "nobody does" in check_fence(leadership, None)
    assert "m2 does since revision 9" in check_fence(leadership, _kv(b"m2", 12, 9))
    # Same candidate, new term (a restarted m1 elected again): the old token is stale.
    assert "since revision 9" in check_fence(leadership, _kv(b"m1", 12, 9))


# -- campaigns on MemoryKV -----------------------------------------------------------------------


def test_first_candidate_wins_the_second_waits(kv):
    a, b = Election(kv, KEY, "m1"), Election(kv, KEY, "m2")
    lease_a, lease_b = kv.grant_lease(5), kv.grant_lease(5)
    won = a.campaign(lease_a.id, timeout_s=1)
    assert won is not None and won.candidate == "m1"
    assert b.campaign(lease_b.id, timeout_s=0) is None
    assert b.leader() == Leader("m1", lease_a.id, won.revision)
    assert a.campaign(lease_a.id, timeout_s=0) == won  # idempotent


def test_lease_expiry_elects_a_new_leader_and_fences_the_stale_one(kv, clock):
    a, b = Election(kv, KEY, "m1"), Election(kv, KEY, "m2")
    lease_a, lease_b = kv.grant_lease(2), kv.grant_lease(2)
    old = a.campaign(lease_a.id, timeout_s=1)
    assert old is not None
    fenced_txn(kv, old, [Put("gemini/job/plan", b"plan by m1")])

    clock.now += 1.5
    kv.refresh_lease(lease_b.id)  # m2's agent is alive; m1's is stuck and stops refreshing
    clock.now += 0.6
    assert kv.expire_leases() == 1
    new = b.campaign(lease_b.id, timeout_s=1)
    assert new is not None and new.revision > old.revision

    # m1's process still runs and still believes it leads: its write is refused.
    with pytest.raises(NotLeaderError, match="m2 does since revision"):
        fenced_txn(kv, old, [Put("gemini/job/plan", b"stale plan by m1")])
    assert kv.get("gemini/job/plan") == b"plan by m1"
    fenced_txn(kv, new, [Put("gemini/job/plan", b"plan by m2")])
    assert kv.get("gemini/job/plan") == b"plan by m2"
    assert a.campaign(lease_a.id, timeout_s=0) is None  # m2 holds the key
    b.resign(new)
    with pytest.raises(LeaseLostError):  # the key is free, but m1's lease is gone
        a.campaign(lease_a.id, timeout_s=0)


def test_fenced_txn_with_a_failing_compare_is_not_a_lost_leadership(kv):
    election = Election(kv, KEY, "m1")
    lease = kv.grant_lease(5)
    leadership = election.campaign(lease.id, timeout_s=1)
    kv.put("gen", b"3")
    result = fenced_txn(
        kv, leadership, [Put("gen", b"5")], compares=[Compare.value("gen", "==", b"4")]
    )
    assert not result.succeeded
    assert result.reads[0].value == b"m1"
    assert kv.get("gen") == b"3"


def test_a_waiting_candidate_wakes_when_the_leader_resigns(kv):
    a, b = Election(kv, KEY, "m1"), Election(kv, KEY, "m2", poll_s=30)
    lease_a, lease_b = kv.grant_lease(5), kv.grant_lease(5)
    leadership = a.campaign(lease_a.id, timeout_s=1)
    won: list[Leadership | None] = []
    waiter = threading.Thread(target=lambda: won.append(b.campaign(lease_b.id, timeout_s=10)))
    waiter.start()
    time.sleep(0.05)
    started = time.monotonic()
    assert a.resign(leadership)
    waiter.join(5)
    assert won and won[0] is not None and won[0].candidate == "m2"
    assert time.monotonic() - started < 1  # woken by the watch, not by the 30 s poll
    assert not a.resign(leadership)  # no longer ours: nothing deleted
    assert b.leader().candidate == "m2"


def test_a_waiting_candidate_wins_when_the_leader_lease_expires(kv, clock):
    a, b = Election(kv, KEY, "m1"), Election(kv, KEY, "m2", poll_s=0.02)
    lease_a, lease_b = kv.grant_lease(2), kv.grant_lease(10)
    a.campaign(lease_a.id, timeout_s=1)
    won: list[Leadership | None] = []
    waiter = threading.Thread(target=lambda: won.append(b.campaign(lease_b.id, timeout_s=10)))
    waiter.start()
    time.sleep(0.05)
    assert not won
    clock.now += 2  # nobody calls expire_leases(): the waiter's next round applies it
    waiter.join(5)
    assert won and won[0] is not None and won[0].candidate == "m2"


def test_observe_reports_the_leader_and_its_changes(kv, clock):
    seen: list[Leader | None] = []
    a, b = Election(kv, KEY, "m1"), Election(kv, KEY, "m2")
    lease_a, lease_b = kv.grant_lease(1), kv.grant_lease(10)
    watch = a.observe(seen.append)
    first = a.campaign(lease_a.id, timeout_s=1)
    clock.now += 1
    kv.expire_leases()
    second = b.campaign(lease_b.id, timeout_s=1)
    deadline = time.monotonic() + 2
    while len(seen) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    watch.cancel()
    assert seen == [
        None,
        Leader("m1", lease_a.id, first.revision),
        None,
        Leader("m2", lease_b.id, second.revision),
    ]
