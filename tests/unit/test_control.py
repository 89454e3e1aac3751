"""The root's fenced decisions: a root whose lease expired cannot open a generation or publish a
plan, even though its process is alive and still believes it leads; warm standbys are assigned
once."""

from __future__ import annotations

import threading
import time

import pytest

from gemini_ckpt.agent.standby import await_assignment
from gemini_ckpt.coordination.control import ControlPlane
from gemini_ckpt.coordination.election import Election
from gemini_ckpt.coordination.job import JobCoordinator
from gemini_ckpt.coordination.memory_kv import MemoryKV
from gemini_ckpt.errors import NotLeaderError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_stale_root_cannot_publish_a_plan_or_open_a_generation():
    clock = Clock()
    kv = MemoryKV(clock=clock)
    plane = ControlPlane(kv, "job", machines=2)
    old_lease = kv.grant_lease(5)
    plane.join(0, old_lease.id, {})
    old = Election(kv, plane.leader_key, "m0").campaign(old_lease.id, timeout_s=0.1)
    assert old is not None
    assert plane.publish_plan(old, 0, {"step": None, "generation": 0}, {"addr": "x", "port": 1})

    clock.now += 6  # machine 0 stops refreshing: its lease expires, machine 1 takes over
    new_lease = kv.grant_lease(5)
    new = Election(kv, plane.leader_key, "m1").campaign(new_lease.id, timeout_s=0.1)
    assert new is not None and new.revision != old.revision

    with pytest.raises(NotLeaderError):
        plane.publish_plan(old, 0, {"step": 7, "generation": 0}, {"addr": "x", "port": 2})
    with pytest.raises(NotLeaderError):
        plane.advance_generation(old, 0, {"kind": "software failure"})
    assert JobCoordinator(kv, "job", 2).generation() == 0
    assert plane.advance_generation(new, 0, {"kind": "machine failure"}, replace=(0,))
    assert JobCoordinator(kv, "job", 2).generation() == 1
    assert plane.replacement_requests()[0]["generation"] == 1


def test_a_plan_for_a_generation_that_moved_on_is_not_published():
    kv = MemoryKV()
    plane = ControlPlane(kv, "job", machines=1)
    lease = kv.grant_lease(5)
    plane.join(0, lease.id, {})
    leadership = Election(kv, plane.leader_key, "m0").campaign(lease.id, timeout_s=0.1)
    assert plane.advance_generation(leadership, 0, {"kind": "software failure"})
    assert not plane.publish_plan(leadership, 0, {"step": 3}, {})
    assert not plane.advance_generation(leadership, 0, {"kind": "software failure"})


def test_a_standby_waits_until_assigned_once_and_leaves_no_records():
    kv = MemoryKV()
    plane = ControlPlane(kv, "job", machines=2)
    got: list[tuple[int, float] | None] = []
    waiter = threading.Thread(
        target=lambda: got.append(
            await_assignment(plane, JobCoordinator(kv, "job", 2), "s0", ttl_s=5, poll_s=0.01)
        )
    )
    waiter.start()
    deadline = time.monotonic() + 5
    while "s0" not in plane.standbys() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert plane.standbys()["s0"]["pid"] > 0
    assert plane.assign_standby("s0", 1, {})
    assert not plane.assign_standby("s0", 0, {})  # a standby becomes one machine only
    waiter.join(5)
    assert got[0] is not None and got[0][0] == 1
    assert plane.standbys() == {}
    assert not kv.get_prefix("gemini/job/standby/").items


def test_a_standby_leaves_when_the_job_ends():
    kv = MemoryKV()
    plane = ControlPlane(kv, "job", machines=1)
    coordinator = JobCoordinator(kv, "job", 1)
    coordinator.fail_job("restart limit reached")
    assert await_assignment(plane, coordinator, "s1", ttl_s=5, poll_s=0.001) is None
    assert plane.standbys() == {}
