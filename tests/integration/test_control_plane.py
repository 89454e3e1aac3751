"""The control plane end to end on the test bed: lost machines, a lost root, an unsteady etcd.

2 machines x 2 ranks train the demo GPT with the persistent tier on and no peer replicas (so a
lost machine's ranks come back from disk; peer replicas have their own tests in
test_peer_recovery.py); every run must end bit-identical to an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gemini_ckpt.demo import final_state
from gemini_ckpt.observability import events as ev
from gemini_ckpt.observability.events import read_events
from gemini_ckpt.recovery.plan import PERSISTENT_TIER
from gemini_ckpt.testbed.local import LocalSpec, LocalTestbed
from helpers.demo_jobs import run_demo_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

STEPS = 16
WORLD = 4
TTL = 2


def run_job(run_dir: Path, faults: tuple[str, ...] = (), **spec: object) -> LocalTestbed:
    fields: dict[str, object] = dict(machines=2, nproc_per_machine=2, replicas=1)
    return run_demo_job(run_dir, (STEPS, 64, 2), faults, **{**fields, **spec})


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    assert run_job(run_dir).summary().recoveries == []
    return run_dir / "final"


def records(bed: LocalTestbed) -> list[dict]:
    return read_events(bed.event_files())


def test_lost_machine_is_replaced_and_the_job_resumes_from_the_persisted_step(tmp_path, reference):
    # A warm standby takes the lost machine's place (the kill-root test starts a new agent).
    bed = run_job(tmp_path, ("kill-machine@step=10,machine=1",), standby=1)
    events = records(bed)
    (fault,) = [e for e in events if e["event"] == ev.FAULT_INJECTED]
    incidents = [e for e in events if e["event"] == ev.INCIDENT and e["kind"] == "machine failure"]
    assert incidents, "the root never classified the loss as a machine failure"
    assert incidents[0]["machines"] == [1]
    # detected within the lease TTL plus a small margin (the root polls every 50 ms)
    assert incidents[0]["decided_at"] - fault["t"] <= TTL + 2.0
    assert [(r["machine"], r["standby"]) for r in bed.replacements] == [(1, "s0")]
    (taken,) = [e for e in events if e["event"] == ev.STANDBY_ASSIGNED]
    assert (taken["machine"], taken["standby"]) == (1, "s0")
    # The pool was refilled once the recovery was over (not during it: same cores).
    first_step = min(
        e["t"] for e in events if e["event"] == ev.PROGRESS and e.get("generation", 0) > 0
    )
    assert set(bed.standbys_started) == {"s0", "s1"}
    assert bed.standbys_started["s1"] >= first_step
    (recovery,) = bed.summary().recoveries
    assert recovery.kind == "machine failure"
    assert recovery.restored_step == 8  # the newest step on disk: machine 1's memory is gone
    assert {recovery.sources[r] for r in (2, 3)} == {PERSISTENT_TIER}
    assert set(recovery.sources) == set(range(WORLD))
    restored = [e for e in events if e["event"] == ev.RESTORED]
    assert sorted(e["rank"] for e in restored) == list(range(WORLD))
    assert {e["step"] for e in restored} == {8}
    assert final_state.compare_dirs(reference, tmp_path / "final", WORLD) == []


def test_losing_the_roots_machine_elects_a_new_root_that_completes_the_recovery(
    tmp_path, reference
):
    # The persistent tier at a URL: restores here go through fsspec, the path s3:// etc. take.
    bed = run_job(tmp_path, ("kill-root@step=10",), persist_dir=f"file://{tmp_path}/ckpt")
    events = records(bed)
    (fault,) = [e for e in events if e["event"] == ev.FAULT_INJECTED]
    assert fault["root"] is True
    lost = fault["machine"]
    elected = [e for e in events if e["event"] == ev.ROOT_ELECTED and e["t"] > fault["t"]]
    assert elected and elected[0]["machine"] != lost
    assert elected[0]["t"] - fault["t"] <= 2 * TTL + 1.0
    (recovery,) = bed.summary().recoveries
    assert recovery.kind == "machine failure"
    assert recovery.restored_step == 8
    assert [r["machine"] for r in bed.replacements] == [lost]
    assert {recovery.sources[r] for r in (2 * lost, 2 * lost + 1)} == {PERSISTENT_TIER}
    assert final_state.compare_dirs(reference, tmp_path / "final", WORLD) == []


def test_a_three_member_etcd_losing_a_member_stops_neither_training_nor_recovery(
    tmp_path, reference
):
    # The leader's death leaves the cluster silent for one to two seconds, which the membership
    # leases must outlive (the test bed refuses a shorter TTL). Saves are skipped meanwhile, and
    # the kill comes after the first commit at or after step 10: steps of 0.3 s keep that within
    # the 16 steps whatever the election takes.
    bed = run_job(
        tmp_path,
        ("kill-etcd-member@step=2,member=leader", "kill-worker@step=10,rank=1"),
        etcd_members=3,
        member_ttl_s=4,
        extra_args=("--min-step-time", "0.3"),
    )
    events = records(bed)
    injected = {e["fault"] for e in events if e["event"] == ev.FAULT_INJECTED}
    assert injected == {"kill-etcd-member@step=2,member=leader", "kill-worker@step=10,rank=1"}
    (recovery,) = bed.summary().recoveries
    assert recovery.kind == "software failure"
    # While there is no leader, saves that etcd cannot vouch for are skipped, and training goes
    # on: no step every machine committed is lost, whichever that was. The job finishing
    # bit-identical shows training and recovery went on.
    skipped = sum(
        p.read_text().count("not checkpointed")
        for p in tmp_path.glob("m*/logs/*/attempt_0/*/stderr.log")
    )
    assert skipped > 0, "no save was skipped: the cluster never went without a leader"
    killed = next(e for e in events if e.get("fault") == "kill-worker@step=10,rank=1")
    newest = [
        max(
            e["step"]
            for e in events
            if e["event"] == ev.PROGRESS and e["machine"] == m and e["t"] < killed["t"]
        )
        for m in range(2)
    ]
    assert killed["step"] >= 10
    assert min(newest) <= recovery.restored_step <= killed["step"]
    assert set(recovery.sources.values()) == {"local memory"}
    assert final_state.compare_dirs(reference, tmp_path / "final", WORLD) == []


def test_training_goes_on_while_a_single_etcd_is_stopped(tmp_path, reference):
    # The stop is shorter than the membership TTL: no machine is declared lost meanwhile.
    bed = run_job(
        tmp_path, ("stop-etcd@step=4,seconds=3",), persist_every=0, persist_dir=None, member_ttl_s=6
    )
    events = records(bed)
    (stopped,) = [e for e in events if e["event"] == ev.FAULT_INJECTED]
    (resumed,) = [e for e in events if e["event"] == ev.ETCD_RESUMED]
    assert resumed["t"] - stopped["t"] >= 3.0
    skipped = sum(
        p.read_text().count("not checkpointed")
        for p in tmp_path.glob("m*/logs/*/attempt_0/*/stderr.log")
    )
    assert skipped > 0, "no save was attempted while etcd was stopped: training stalled"
    assert bed.summary().recoveries == []
    assert final_state.compare_dirs(reference, tmp_path / "final", WORLD) == []


def test_checkpoints_resume_once_etcd_is_back(tmp_path):
    script = Path(__file__).resolve().parents[1] / "helpers" / "tiny_train.py"
    spec = LocalSpec(
        machines=2,
        nproc_per_machine=1,
        script=script,
        script_args=("--steps", "60", "--sleep", "0.1"),
        run_dir=tmp_path,
        faults=("stop-etcd@step=5,seconds=2",),
        member_ttl_s=6,
    )
    with LocalTestbed(spec) as bed:
        assert bed.wait(200) == 0, bed.agent_log(0)[-3000:]
    events = read_events(bed.event_files())
    (resumed,) = [e for e in events if e["event"] == ev.ETCD_RESUMED]
    progress = [e for e in events if e["event"] == ev.PROGRESS and e["machine"] == 0]
    assert progress[-1]["step"] == 60
    assert any(e["t"] > resumed["t"] for e in progress)
