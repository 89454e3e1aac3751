"""`gemini-ckpt status` on a real etcd: a test-bed job seen while it runs and after it ended."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import pytest

from gemini_ckpt.cli.main import main
from gemini_ckpt.config import EtcdClientConfig
from gemini_ckpt.coordination.etcd_kv import EtcdKV
from gemini_ckpt.coordination.etcd_server import EtcdServer
from gemini_ckpt.observability import events as ev
from gemini_ckpt.observability.events import read_events
from gemini_ckpt.testbed.local import LocalSpec, LocalTestbed

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd missing (package etcd-server)"),
]

SCRIPT = Path(__file__).resolve().parents[1] / "helpers" / "tiny_train.py"
STEPS = 40


def _status(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["status", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _wait_for_progress_after_restart(bed: LocalTestbed, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = read_events([bed.event_file(m) for m in range(2)])
        if any(e["event"] == ev.PROGRESS and e.get("generation") == 1 for e in records):
            return
        assert bed.poll() is None, "\n".join(bed.agent_log(m) for m in range(2))
        time.sleep(0.2)
    pytest.fail(f"no step completed in generation 1 within {timeout_s} s")


@pytest.mark.timeout(240)
def test_status_of_a_job_while_it_runs_and_after_it_ended(tmp_path, capsys):
    spec_args = dict(
        machines=2,
        nproc_per_machine=2,
        script=SCRIPT,
        script_args=("--steps", str(STEPS), "--sleep", "0.1"),
        faults=("kill-worker@step=5,rank=3",),
        run_dir=tmp_path / "run",
        max_restarts=2,
    )
    with EtcdServer() as server:
        with LocalTestbed(LocalSpec(**spec_args, etcd=server.endpoint)) as bed:
            _wait_for_progress_after_restart(bed, 150)
            code, out, err = _status(capsys, "--etcd", server.endpoint)
            assert code == 0, err
            lines = out.splitlines()
            assert lines[0].startswith(f"job       {bed.job_id}  (read at ")
            assert lines[1:3] == ["state     running", "generation 1"]
            assert lines[3].startswith("root      m")
            machine_rows = [line.split() for line in lines if line.startswith(("0 ", "1 "))]
            assert [row[:2] for row in machine_rows[:2]] == [["0", "alive"], ["1", "alive"]]
            assert any(
                line.startswith("last recovery: generation 1, software failure: ") for line in lines
            )
            code = bed.wait(150)
        assert code == 0, "\n".join(bed.agent_log(m) for m in range(2))

        code, out, err = _status(
            capsys, "--etcd", server.endpoint, "--run-id", bed.job_id, "-o", "json"
        )
        assert code == 0, err
        status = json.loads(out)
        assert (status["job"], status["state"], status["generation"]) == (bed.job_id, "finished", 1)
        assert status["failure"] is None
        assert status["root"] is None  # the agents ended: their leases and the election key went
        assert [(m["machine"], m["alive"], m["done"]) for m in status["machines"]] == [
            (0, False, True),
            (1, False, True),
        ]
        assert status["latest_complete_step"] == STEPS
        assert [(r["rank"], r["restored_from"]) for r in status["ranks"]] == [
            (r, "local memory") for r in range(4)
        ]
        timeline = status["timeline"]
        assert (timeline["generation"], timeline["kind"], timeline["step"]) == (
            1,
            "software failure",
            5,
        )
        labels = [m["milestone"] for m in timeline["milestones"]]
        assert labels[:3] == ["detected", "decided", "planned"]
        # Then each machine's part, in time order: all its ranks restored, its first step done.
        assert sorted(labels[3:]) == [
            "m0 first step",
            "m0 restored",
            "m1 first step",
            "m1 restored",
        ]
        assert labels.index("m0 restored") < labels.index("m0 first step")
        assert all(m["since_previous_s"] >= 0 for m in timeline["milestones"][1:])


def test_several_jobs_are_listed_and_one_must_be_picked(capsys):
    with EtcdServer() as server:
        with EtcdKV(EtcdClientConfig(server.endpoints)).start() as kv:
            for job in ("job-a", "job-b"):
                kv.put(f"gemini/{job}/generation", b"0")
        code, out, err = _status(capsys, "--etcd", server.endpoint)
        assert code == 2 and out == ""
        assert err.splitlines()[1:] == ["  job-a", "  job-b"]
        code, out, err = _status(capsys, "--etcd", server.endpoint, "--run-id", "job-b")
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].startswith("job       job-b ")
        assert lines[1:3] == ["state     stopped (no agent alive)", "generation 0"]


def test_an_unreachable_etcd_is_an_error_naming_the_endpoints(capsys, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    monkeypatch.setenv("GEMINI_ETCD", f"127.0.0.1:{port}")
    started = time.monotonic()
    code, out, err = _status(capsys)  # --etcd from its environment twin
    assert code == 1 and out == ""
    assert f"cannot reach etcd at 127.0.0.1:{port}" in err
    assert time.monotonic() - started < 15
