"""`gemini-ckpt launch` on its own (no test bed), and a job that keeps failing."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemini_ckpt.observability import events as ev
from gemini_ckpt.observability.events import read_events
from gemini_ckpt.testbed.local import LocalSpec, LocalTestbed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SCRIPT = Path(__file__).resolve().parents[1] / "helpers" / "tiny_train.py"


def test_standalone_launch_restarts_a_killed_trainer_from_memory(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gemini_ckpt",
            "launch",
            "--standalone",
            "--nproc-per-node",
            "2",
            "--run-id",
            f"standalone-{tmp_path.name}",
            "--run-dir",
            str(run_dir),
            "--fault",
            "kill-worker@step=3,rank=1",
            "--max-restarts",
            "1",
            str(SCRIPT),
            "--steps",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_events([run_dir / "m0" / "events.jsonl"])
    restored = [(e["rank"], e["step"], e["source"]) for e in records if e["event"] == ev.RESTORED]
    assert sorted(restored) == [(0, 3, "local memory"), (1, 3, "local memory")]
    assert records[-1]["event"] == ev.JOB_FINISHED
    assert records[-1]["status"] == "succeeded"


def test_a_job_that_keeps_failing_stops_at_the_restart_limit(tmp_path):
    spec = LocalSpec(
        machines=1,
        nproc_per_machine=1,
        script=SCRIPT,
        script_args=("--steps", "5", "--raise-at", "3"),
        run_dir=tmp_path,
        max_restarts=1,
    )
    with LocalTestbed(spec) as bed:
        code = bed.wait(200)
    assert code == 1
    summary = bed.summary()
    assert summary.status == "failed"
    records = read_events([bed.event_file(0)])
    failures = [e for e in records if e["event"] == ev.WORKER_FAILED]
    assert [e["generation"] for e in failures] == [0, 1]
    assert all(e["exitcode"] == 1 and "boom at step 3" in e["stderr_tail"] for e in failures)
    finished = [e for e in records if e["event"] == ev.JOB_FINISHED]
    assert "restart limit reached" in finished[-1]["reason"]
    # The second attempt resumed from the step the first one had reached, from memory.
    restored = [e for e in records if e["event"] == ev.RESTORED]
    assert [(e["step"], e["source"]) for e in restored] == [(2, "local memory")]


def test_a_hung_trainer_is_detected_and_the_job_resumes_from_memory(tmp_path):
    spec = LocalSpec(
        machines=1,
        nproc_per_machine=2,
        script=SCRIPT,
        script_args=("--steps", "6"),
        run_dir=tmp_path,
        max_restarts=1,
        faults=("hang@step=3,rank=1",),
        hang_timeout_s=4.0,
        startup_timeout_s=120.0,
        stop_grace_s=1.0,
    )
    with LocalTestbed(spec) as bed:
        code = bed.wait(200)
    assert code == 0, bed.agent_log(0)
    records = read_events([bed.event_file(0)])
    injected = [e for e in records if e["event"] == ev.FAULT_INJECTED]
    assert [(e["rank"], e["step"], e["signal"]) for e in injected] == [(1, 3, "SIGSTOP")]
    hangs = [e for e in records if e["event"] == ev.HANG]
    assert len(hangs) == 1
    assert "s since step 3 (deadline 4 s)" in hangs[0]["reason"]
    assert hangs[0]["t"] - injected[0]["t"] >= 4.0
    (recovery,) = bed.summary().recoveries
    assert recovery.restored_step == 3
    assert recovery.sources == {0: "local memory", 1: "local memory"}


def test_a_second_agent_for_the_same_machine_is_refused_and_the_first_unharmed(tmp_path):
    def launch(name: str, *extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gemini_ckpt",
                "launch",
                "--standalone",
                "--run-id",
                f"dup-{tmp_path.name}",
                "--run-dir",
                str(tmp_path / name),
                str(SCRIPT),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    # Long enough to outlast the second agent's start-up on a loaded host.
    first = launch("a", "--steps", "80", "--sleep", "0.1")
    events_file = tmp_path / "a" / "m0" / "events.jsonl"
    deadline = time.monotonic() + 60
    while not any(e["event"] == ev.PROGRESS for e in read_events([events_file])):
        assert time.monotonic() < deadline and first.poll() is None, first.stdout.read()
        time.sleep(0.2)
    second = launch("b")
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 2
    assert "another agent (pid" in out
    assert "give this job its own --run-id" in out
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out


def test_run_ids_must_be_safe_names(capsys):
    from gemini_ckpt.cli.main import main

    assert main(["launch", "--run-id", "../etc", str(SCRIPT)]) == 2
    assert "must be 1-64 letters, digits" in capsys.readouterr().err
