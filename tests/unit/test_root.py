"""The root's tick on in-memory etcd: which absent machines are lost, and which are not."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemini_ckpt.agent.root import RootRole
from gemini_ckpt.coordination.control import ControlPlane
from gemini_ckpt.coordination.election import Election, Leadership
from gemini_ckpt.coordination.job import JobCoordinator
from gemini_ckpt.coordination.memory_kv import MemoryKV
from gemini_ckpt.observability.events import EventLog
from helpers.configs import agent_config


def started_job(
    tmp_path: Path, machines: int = 2
) -> tuple[RootRole, Leadership, MemoryKV, list[int]]:
    """The machines joined, machine 0 leads, generation 0 planned; returns the leases too."""
    kv = MemoryKV()
    plane = ControlPlane(kv, "job", machines=machines)
    coordinator = JobCoordinator(kv, "job", machines=machines)
    leases = [kv.grant_lease(5).id for _ in range(machines)]
    for machine, lease in enumerate(leases):
        plane.join(machine, lease, {})
    leadership = Election(kv, plane.leader_key, "m0").campaign(leases[0], timeout_s=0.1)
    assert leadership is not None
    config = agent_config(tmp_path, machines)
    root = RootRole(config, plane, coordinator, EventLog(None), persistent=None)
    plane.publish_plan(leadership, 0, {"step": None, "generation": 0}, {"addr": "x", "port": 1})
    return root, leadership, kv, leases


def test_a_machine_that_finished_and_left_is_not_declared_lost(tmp_path):
    root, leadership, kv, leases = started_job(tmp_path)
    JobCoordinator(kv, "job", 2).mark_done(0, 1)
    kv.revoke_lease(leases[1])  # its agent exits after the job's last step
    root._tick(leadership)
    assert JobCoordinator(kv, "job", 2).generation() == 0
    assert ControlPlane(kv, "job", 2).replacement_requests() == {}


@pytest.mark.parametrize("finished_elsewhere", [False, True])
def test_a_machine_that_left_without_finishing_is_replaced(tmp_path, finished_elsewhere):
    root, leadership, kv, leases = started_job(tmp_path)
    if finished_elsewhere:  # the root's own machine finishing does not excuse machine 1
        JobCoordinator(kv, "job", 2).mark_done(0, 0)
    kv.revoke_lease(leases[1])
    root._tick(leadership)
    assert JobCoordinator(kv, "job", 2).generation() == 1
    assert ControlPlane(kv, "job", 2).replacement_requests()[1]["generation"] == 1


def test_machines_lost_one_after_another_are_each_replaced_once(tmp_path):
    root, leadership, kv, leases = started_job(tmp_path, machines=3)
    plane, coordinator = ControlPlane(kv, "job", 3), JobCoordinator(kv, "job", 3)
    kv.revoke_lease(leases[1])
    root._tick(leadership)
    kv.revoke_lease(leases[2])
    root._tick(leadership)
    for _ in range(3):  # machine 1's replacement is still on its way: not lost again
        root._tick(leadership)
    assert coordinator.generation() == 2
    requests = plane.replacement_requests()
    assert {m: r["generation"] for m, r in requests.items()} == {1: 1, 2: 2}
    # Machine 1's replacement joins (fulfilling the request), then dies: that is a new loss.
    lease = kv.grant_lease(5).id
    plane.join(1, lease, {})
    assert "joined_at" in plane.replacement_requests()[1]
    kv.revoke_lease(lease)
    root._tick(leadership)
    assert coordinator.generation() == 3
    assert plane.replacement_requests()[1]["generation"] == 3
