"""Peer replicas end to end: 4 machines x 1 rank, m = 2 (groups {0, 1} and {2, 3}).

A lost machine's rank comes back from its group peer's memory at the step it died at; a lost
group falls back to the persistent tier for everyone; a damaged replica is detected on the way in
and the next source is used. Every run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gemini_ckpt.demo import final_state
from gemini_ckpt.observability import events as ev
from gemini_ckpt.observability.events import read_events
from gemini_ckpt.recovery.plan import LOCAL_MEMORY, PERSISTENT_TIER, peer_source
from gemini_ckpt.testbed.local import LocalTestbed
from helpers.demo_jobs import run_demo_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

STEPS = 14
MACHINES = 4


def run_job(run_dir: Path, faults: tuple[str, ...] = (), **spec: object) -> LocalTestbed:
    fields: dict[str, object] = dict(machines=MACHINES, nproc_per_machine=1, replicas=2)
    return run_demo_job(run_dir, (STEPS, 32, 1), faults, **{**fields, **spec})


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    assert run_job(run_dir).summary().recoveries == []
    return run_dir / "final"


def records(bed: LocalTestbed) -> list[dict]:
    return read_events(bed.event_files())


def test_a_lost_machine_restores_the_step_it_died_at_from_its_group_peer(tmp_path, reference):
    # A chunk damaged on the wire earlier is refused by the receiver; the next push succeeds.
    bed = run_job(
        tmp_path,
        ("corrupt-chunk@step=4,rank=1,where=flight", "kill-machine@step=8,machine=1"),
    )
    events = records(bed)
    (recovery,) = bed.summary().recoveries
    assert recovery.kind == "machine failure"
    assert recovery.restored_step == 8  # at most the iteration in progress is lost
    assert recovery.sources == {
        0: LOCAL_MEMORY,
        1: peer_source(0),
        2: LOCAL_MEMORY,
        3: LOCAL_MEMORY,
    }
    fetched = [e for e in events if e["event"] == ev.REPLICA_FETCHED]
    assert [(e["rank"], e["step"], e["machine"]) for e in fetched] == [(1, 8, 0)]
    rejected = [e for e in events if e["event"] == ev.REPLICA_REJECTED]
    assert [e["rank"] for e in rejected] == [1]
    assert 4 <= rejected[0]["step"] < 8  # the first push from step 4 on
    assert "chunk(s) 0 failed verification" in rejected[0]["reason"]
    assert final_state.compare_dirs(reference, tmp_path / "final", MACHINES) == []


def test_losing_a_whole_group_falls_back_to_the_persistent_tier_for_everyone(tmp_path, reference):
    bed = run_job(tmp_path, ("kill-group@step=10,group=0",))
    (recovery,) = bed.summary().recoveries
    assert recovery.kind == "machine failure"
    assert recovery.restored_step == 8  # the newest persisted step
    assert recovery.sources == dict.fromkeys(range(MACHINES), PERSISTENT_TIER)
    assert sorted(r["machine"] for r in bed.replacements) == [0, 1]
    assert final_state.compare_dirs(reference, tmp_path / "final", MACHINES) == []


def test_a_damaged_replica_is_skipped_for_the_next_source(tmp_path, reference):
    bed = run_job(
        tmp_path,
        ("corrupt-chunk@step=10,rank=3,where=replica", "kill-machine@step=10,machine=3"),
    )
    events = records(bed)
    corrupt = [e for e in events if e["event"] == ev.CORRUPT]
    assert corrupt and corrupt[0]["rank"] == 3 and corrupt[0]["source"] == peer_source(2)
    final = bed.summary().recoveries[-1]
    # Machine 2 held the only copy of rank 3's step 10: the job resumes from an older step that
    # every rank still has somewhere (machine 2's older replica, or the persistent tier).
    assert final.restored_step in (8, 9)
    assert final.sources[3] in (peer_source(2), PERSISTENT_TIER)
    assert final_state.compare_dirs(reference, tmp_path / "final", MACHINES) == []


INTERLEAVED = dict(
    link_bandwidth="1gbit",  # on loopback nothing is capped: only the schedule's cost model
    agent_args=("--interleave", "--profile-iterations", "3", "--interleave-sub-buffers", "2"),
    # The tiny model's collectives fill most of its 25 ms iterations; on a busy host the gaps
    # fall below the profiler's shortest span and the schedule goes unpaced. A padded step
    # leaves every iteration a real idle span without changing what is computed.
    extra_args=("--min-step-time", "0.1"),
)


def test_with_interleaving_a_lost_machine_still_restores_from_its_peer(tmp_path, reference):
    bed = run_job(tmp_path, ("kill-machine@step=10,machine=1",), **INTERLEAVED)
    events = records(bed)
    schedules = [e for e in events if e["event"] == ev.INTERLEAVE_SCHEDULE]
    assert {e["machine"] for e in schedules} >= set(range(MACHINES))
    assert all(e["interval"] == 1 and e["spans"] for e in schedules)
    replicated = [e for e in events if e["event"] == ev.REPLICATED and e["generation"] == 0]
    # Nothing is sent while the trainers profile (2 warm-up + 3 iterations after the restore).
    assert replicated and min(e["step"] for e in replicated) >= 5
    (recovery,) = bed.summary().recoveries
    assert recovery.restored_step == 10
    assert recovery.sources[1] == peer_source(0)
    assert final_state.compare_dirs(reference, tmp_path / "final", MACHINES) == []
