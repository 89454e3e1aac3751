"""Whole jobs on the one-host test bed: real agent processes, real trainers on gloo, real SIGKILL.

2 machines x 2 ranks train the demo GPT; a trainer is killed; the job must resume from the right
step with every rank's state from local memory and end bit-identical to an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gemini_ckpt.cli.main import main
from gemini_ckpt.demo import final_state, train_gpt
from gemini_ckpt.observability import events as ev
from gemini_ckpt.observability.events import read_events
from gemini_ckpt.testbed.local import LocalSpec, LocalTestbed
from helpers.demo_jobs import newest_common_step

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SCRIPT = Path(train_gpt.__file__)
STEPS = 12
WORLD = 4


def run_job(run_dir: Path, faults: tuple[str, ...] = ()) -> LocalTestbed:
    args = (
        "--steps",
        str(STEPS),
        "--d-model",
        "64",
        "--layers",
        "2",
        "--batch",
        "4",
        "--seq",
        "32",
        "--final-state",
        str(run_dir / "final"),
    )
    spec = LocalSpec(
        machines=2,
        nproc_per_machine=2,
        script=SCRIPT,
        script_args=args,
        faults=faults,
        run_dir=run_dir,
        max_restarts=2,
        env={"GEMINI_CHUNK_SIZE": "64KiB"},
    )
    with LocalTestbed(spec) as bed:
        code = bed.wait(240)
    assert code == 0, "\n".join(bed.agent_log(m) for m in range(2))
    return bed


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    bed = run_job(run_dir)
    assert bed.summary().recoveries == []
    return run_dir / "final"


def restored_events(bed: LocalTestbed) -> list[dict]:
    records = read_events([bed.event_file(m) for m in range(2)])
    return [e for e in records if e["event"] == ev.RESTORED]


def test_killed_trainer_resumes_from_its_step_from_local_memory(tmp_path, reference):
    bed = run_job(tmp_path, ("kill-worker@step=6,rank=1",))
    summary = bed.summary()
    assert summary.status == "succeeded" and summary.final_step == STEPS
    (recovery,) = summary.recoveries
    assert any("rank 1" in f and "killed by SIGKILL" in f for f in recovery.failures)
    # Rank 1 dies right after committing step 6; the others' saves of 6 race the stop.
    expected = newest_common_step(bed, 2)
    assert expected in (5, 6)
    assert recovery.restored_step == expected
    assert recovery.sources == dict.fromkeys(range(WORLD), "local memory")
    assert recovery.iterations_lost in (0, 1)
    restored = restored_events(bed)
    assert sorted(e["rank"] for e in restored) == list(range(WORLD))
    assert {(e["step"], e["source"]) for e in restored} == {(expected, "local memory")}
    logs = sorted(tmp_path.glob("m*/logs/*/attempt_1/*/stdout.log"))
    assert len(logs) == 2 * 2
    started = f"starting at step {expected} (state from local memory)"
    assert all(started in p.read_text() for p in logs)
    assert final_state.compare_dirs(reference, tmp_path / "final", WORLD) == []


def test_kill_in_the_middle_of_save_restores_the_previous_complete_step(tmp_path, reference):
    bed = run_job(tmp_path, ("kill-worker@step=6,rank=2,point=mid-save",))
    (recovery,) = bed.summary().recoveries
    assert recovery.restored_step == 5  # step 6 of rank 2 was torn: never visible
    assert recovery.sources == dict.fromkeys(range(WORLD), "local memory")
    injected = [e for e in read_events([bed.event_file(1)]) if e["event"] == ev.FAULT_INJECTED]
    assert [(e["rank"], e["step"], e["point"]) for e in injected] == [(2, 6, "mid-save")]
    assert final_state.compare_dirs(reference, tmp_path / "final", WORLD) == []


def test_malformed_fault_is_a_usage_error(capsys):
    code = main(["local", "--fault", "kill-worker@step=x,rank=1", str(SCRIPT)])
    assert code == 2
    assert (
        "step='x' in fault 'kill-worker@step=x,rank=1' is not an integer" in capsys.readouterr().err
    )
