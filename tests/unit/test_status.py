"""`gemini-ckpt status`: the status assembled from a job's records, written by the real writers
(`ControlPlane`, `JobCoordinator`, `Election`) into MemoryKV with a fake clock."""

from __future__ import annotations

import json

import pytest

from gemini_ckpt.cli import status_cmd
from gemini_ckpt.cli.status_cmd import assemble, job_names, read_job
from gemini_ckpt.cli.status_render import clock, render_table
from gemini_ckpt.coordination.control import ControlPlane
from gemini_ckpt.coordination.election import Election, Leadership
from gemini_ckpt.coordination.job import JobCoordinator
from gemini_ckpt.coordination.kv import MemoryKV

JOB = "j1"
LOCAL = "local memory"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Job:
    """Two machines (ranks 0-1 on m0, 2-3 on m1) of job j1, m0 the root."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.kv = MemoryKV(clock=self.clock)
        self.plane = ControlPlane(self.kv, JOB, 2)
        self.coordinator = JobCoordinator(self.kv, JOB, 2)
        self.leases = [self.kv.grant_lease(2).id for _ in range(2)]
        for m, lease in enumerate(self.leases):
            record = {"pid": 100 + m, "host": f"h{m}", "ranks": [2 * m, 2 * m + 1]}
            self.plane.join(m, lease, {**record, "started_at": 50.0 + m})
        election = Election(self.kv, self.plane.leader_key, "m0")
        leadership = election.campaign(self.leases[0], timeout_s=1.0)
        assert leadership is not None
        self.leadership: Leadership = leadership
        for m in range(2):
            self.plane.report(m, {"generation": 0, "at": 60.0 + m, "last_step": None})
        fresh = {"generation": 0, "step": None, "sources": {}, "reason": "fresh start"}
        self.plane.publish_plan(self.leadership, 0, fresh, {"addr": "x", "port": 1})
        self.plane.record_timeline(0, None, {"planned_at": 61.5})

    def incident(self, kind: str, replace: tuple[int, ...] = ()) -> None:
        """Generation 1 for an incident on machine 1: detected 200, decided 200.5."""
        record = {
            "kind": kind,
            "reason": f"{kind} on machine 1",
            "machines": [1],
            "detected_at": 200.0,
            "decided_at": 200.5,
        }
        assert self.plane.advance_generation(self.leadership, 0, record, replace)

    def plan(self, step: int, sources: str = LOCAL) -> None:
        """Generation 1's plan, planned at 201.25, then both machines report and commit step+1."""
        plan = {"generation": 1, "step": step, "sources": dict.fromkeys("0123", sources)}
        assert self.plane.publish_plan(self.leadership, 1, {**plan, "reason": "r"}, {})
        self.plane.record_timeline(
            1, None, {"planned_at": 201.25, "step": step, "plan_reason": "newest common step"}
        )
        for m in range(2):
            self.plane.report(m, {"generation": 1, "at": 202.0, "last_step": step})
            self.coordinator.report_committed(1, step + 1, machine=m)

    def status(self) -> dict:
        return assemble(JOB, read_job(self.kv, JOB), now=300.0)


@pytest.fixture
def job():
    j = Job()
    yield j
    j.kv.close()


def test_a_running_job_after_a_software_failure(job):
    job.incident("software failure")
    job.plan(6)
    status = job.status()
    assert (status["job"], status["generation"], status["state"]) == (JOB, 1, "running")
    assert status["failure"] is None
    root = status["root"]
    assert (root["candidate"], root["machine"], root["revision"]) == (
        "m0",
        0,
        job.leadership.revision,
    )
    # Elected after both agents joined; the earliest stamp written after it: generation 0's plan.
    assert (root["elected_after"], root["elected_before"]) == (51.0, 61.5)
    machines = status["machines"]
    assert [(m["machine"], m["alive"], m["pid"], m["host"], m["ranks"]) for m in machines] == [
        (0, True, 100, "h0", [0, 1]),
        (1, True, 101, "h1", [2, 3]),
    ]
    assert [m["lease"] for m in machines] == [f"{lease:x}" for lease in job.leases]
    assert [(m["last_step"], m["reported_at"], m["failed_ranks"]) for m in machines] == [
        (6, 202.0, []),
        (6, 202.0, []),
    ]
    # Step 7 is complete (both machines committed it); the plan restored step 6.
    assert status["latest_complete_step"] == 7
    assert [(r["rank"], r["machine"], r["latest_complete_step"]) for r in status["ranks"]] == [
        (0, 0, 7),
        (1, 0, 7),
        (2, 1, 7),
        (3, 1, 7),
    ]
    assert {r["restored_from"] for r in status["ranks"]} == {LOCAL}
    timeline = status["timeline"]
    assert (timeline["generation"], timeline["kind"], timeline["step"]) == (
        1,
        "software failure",
        6,
    )
    marks = [(m["milestone"], m["at"], m["since_previous_s"]) for m in timeline["milestones"]]
    assert marks == [("detected", 200.0, None), ("decided", 200.5, 0.5), ("planned", 201.25, 0.75)]
    assert timeline["total_s"] == 1.25
    json.dumps(status)  # the -o json output


def test_failed_ranks_of_the_current_generation_only(job):
    job.plane.report(1, {"generation": 0, "at": 199.0, "last_step": 5, "failed_ranks": [3]})
    (m1,) = [m for m in job.status()["machines"] if m["machine"] == 1]
    assert m1["failed_ranks"] == [3]
    job.incident("software failure")
    (m1,) = [m for m in job.status()["machines"] if m["machine"] == 1]
    assert m1["failed_ranks"] == []  # reported for generation 0; generation 1 is current
    assert m1["reported_generation"] == 0


def test_a_lost_machine_its_replacement_and_the_agents_parts(job):
    job.clock.now += 3  # both leases expire (nobody keeps them alive here); m0 comes back
    job.leases[0] = job.kv.grant_lease(2).id
    job.plane.join(0, job.leases[0], {"pid": 100, "host": "h0", "ranks": [0, 1]})
    leadership = Election(job.kv, job.plane.leader_key, "m0").campaign(job.leases[0], 1.0)
    assert leadership is not None
    job.leadership = leadership
    job.incident("machine failure", replace=(1,))
    status = job.status()
    assert [(m["machine"], m["alive"], m["lease"]) for m in status["machines"]] == [
        (0, True, f"{job.leases[0]:x}"),
        (1, False, None),
    ]
    assert status["machines"][1]["ranks"] == []  # nothing names them yet
    job.plane.report_replaced(1, {"generation": 1, "replaced_at": 200.75})
    job.plan(4, sources="persistent tier")
    job.plane.record_timeline(1, 1, {"restored_at": 203.0, "first_step_at": 203.5})
    status = job.status()
    labels = [(m["milestone"], m["since_previous_s"]) for m in status["timeline"]["milestones"]]
    assert labels == [
        ("detected", None),
        ("decided", 0.5),
        ("m1 replaced", 0.25),
        ("planned", 0.5),
        ("m1 restored", 1.75),
        ("m1 first step", 0.5),
    ]
    assert status["timeline"]["kind"] == "machine failure"
    assert status["timeline"]["agents"] == {"1": {"restored_at": 203.0, "first_step_at": 203.5}}
    assert status["machines"][1]["replaced_at"] == 200.75
    # The plan names 4 ranks on 2 machines: torchrun's layout gives machine 1 ranks 2 and 3.
    assert status["machines"][1]["ranks"] == [2, 3]
    assert {r["restored_from"] for r in status["ranks"]} == {"persistent tier"}


def test_finished_and_failed_jobs(job):
    job.incident("software failure")
    job.plan(6)
    for m in range(2):
        job.coordinator.mark_done(1, m)
    assert job.status()["state"] == "finished"
    job.plane.fail_job(job.leadership, "restart limit reached")
    status = job.status()
    assert (status["state"], status["failure"]) == ("failed", "restart limit reached")


def test_a_job_with_no_recovery_and_no_root(job):
    job.kv.delete(job.plane.leader_key)
    status = job.status()
    assert status["root"] is None
    assert status["timeline"] is None  # generation 0's plan is the start, not a recovery
    assert status["latest_complete_step"] is None
    lines = render_table(status)
    assert "root      none elected" in lines
    assert lines[-1] == "last recovery: none"


def test_render_table(job):
    job.incident("software failure")
    job.plan(6)
    lines = render_table(job.status())
    assert lines[:3] == [
        f"job       {JOB}  (read at {clock(300.0)})",
        "state     running",
        "generation 1",
    ]
    assert lines[3] == (
        f"root      m0 (fencing revision {job.leadership.revision}; "
        f"elected between {clock(51.0)} and {clock(61.5)})"
    )
    assert "latest step complete on every rank: 7" in lines
    header = lines.index(next(line for line in lines if line.startswith("machine ")))
    assert lines[header].split() == [
        "machine", "lease", "pid", "host", "ranks", "reported", "gen", "step", "at", "failed",
        "ranks", "done", "memory", "own+replicas", "replica", "lag", "interleaving",
    ]  # fmt: skip
    assert lines[header + 1].split()[:8] == [
        "0", "alive", f"{job.leases[0]:x}", "100", "h0", "0,1", "1", "6",
    ]  # fmt: skip
    ranks = lines.index(next(line for line in lines if line.startswith("rank ")))
    assert lines[ranks + 4].split() == ["3", "1", "7", "local", "memory"]
    recovery = lines.index(next(line for line in lines if line.startswith("last recovery")))
    assert lines[recovery] == (
        "last recovery: generation 1, software failure: software failure on machine 1"
    )
    assert lines[recovery + 1] == "  restored step 6: newest common step"
    assert lines[recovery + 4].split() == ["decided", clock(200.5), "+0.500", "s"]
    assert lines[-1] == "  total 1.250 s from first to last milestone"


def test_job_names_are_the_jobs_with_a_generation_counter():
    keys = [
        "gemini/a/generation",
        "gemini/a/members/m0",
        "gemini/b/generation",
        "gemini/b/gen1/plan",
        "gemini/c/status/m0",  # no counter: not a job
        "other/d/generation",
    ]
    assert job_names(keys) == ["a", "b"]


def test_list_jobs_reads_etcd(job):
    JobCoordinator(job.kv, "j2", 1).request_restart(0, 0, {})
    assert status_cmd.list_jobs(job.kv) == ["j1", "j2"]


def test_memory_and_replica_lag_are_shown_per_machine(job):
    job.plane.report(
        0,
        {
            "generation": 0,
            "at": 299.0,
            "last_step": 9,
            "memory": {"own": 4 << 20, "replicas": 8 << 20, "budget": 1 << 30},
            "replica_lag": {"1": 0, "2": None},
            "interleave": {"profiled": True, "interval": 2, "chunks": 40, "in_window": 38},
        },
    )
    status = job.status()
    assert status["machines"][0]["memory"]["replicas"] == 8 << 20
    row = next(line for line in render_table(status) if line.startswith("0 "))
    assert row.endswith("4.00 MiB+8.00 MiB    m1:0,m2:-    every 2 it, 38/40 in idle time")
