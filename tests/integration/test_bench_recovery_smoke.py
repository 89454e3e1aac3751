"""The recovery benchmark with tiny inputs (one short job per test), so it cannot rot unnoticed."""

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_recovery

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(240),
    pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd missing (package etcd-server)"),
]

TINY = ["--repeats", "1", "--steps", "7", "--fail-at", "4", "--d-model", "32", "--layers", "1"]


def run_bench(tmp_path: Path, scenario: str, *extra: str) -> tuple[dict, dict]:
    out = tmp_path / "recovery.json"
    argv = [*TINY, "--scenarios", scenario, "--persist-every", "2", "--member-ttl", "2", *extra]
    report = bench_recovery.main([*argv, "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert list(report["results"]) == [scenario]
    assert report["results"][scenario]["root_killed"] == []  # nothing is set apart here
    (only,) = report["results"][scenario]["runs"]
    return report, only


def check_phases(report: dict, run: dict, scenario: str, expected: list[str]) -> None:
    assert list(run["phases"]) == [*expected, "total"]
    assert all(seconds >= 0 for seconds in run["phases"].values()), run["phases"]
    marks = run["milestones"]
    times = [marks[m] for m in bench_recovery.MILESTONES if marks[m] is not None]
    assert times == sorted(times), marks
    assert len(times) == len(expected) + 1
    assert run["phases"]["total"] == pytest.approx(sum(run["phases"][p] for p in expected))
    summary = report["results"][scenario]["summary"]
    for name in [*expected, "total", "state_load_per_rank"]:
        assert 0 <= summary[name]["min"] <= summary[name]["median"]
    assert bench_recovery.table(report)[0].startswith("| phase | ")


def test_software_failure_breakdown(tmp_path):
    report, run = run_bench(tmp_path, "software", "--import-repeats", "1")
    phases = ["detect", "decide", "plan", "spawn", "load", "first_step"]
    check_phases(report, run, "software", phases)
    marks = run["milestones"]
    assert (marks["kind"], marks["restored_step"], marks["replaced"]) == (
        "software failure",
        4,
        None,
    )
    assert marks["sources"] == dict.fromkeys("0123", "local memory")
    assert run["fault"] == "kill-worker@step=4,rank=3"
    reference = report["reference"]
    assert list(reference) == ["import_torch_1_processes_s", "import_torch_4_processes_s"]
    assert all(0 < r["min"] <= r["median"] for r in reference.values())


def test_machine_failure_breakdown(tmp_path):
    # A killed root (the election is a race) is kept rather than repeated: one job per test.
    report, run = run_bench(
        tmp_path, "machine", "--import-repeats", "0", "--root-kill-retries", "0"
    )
    phases = ["detect", "decide", "replace", "plan", "spawn", "load", "first_step"]
    check_phases(report, run, "machine", phases)
    marks = run["milestones"]
    assert marks["kind"] == "machine failure"
    # The replacement's memory is empty: its ranks come from machine 0's replicas, at the step
    # machine 1 died at.
    assert marks["restored_step"] == 4
    assert (marks["sources"]["2"], marks["sources"]["3"]) == ("peer machine 0",) * 2
    assert set(marks["operator"]) == {"started_at", "replaced_at"}
    assert run["fault"] == "kill-machine@step=4,machine=1"
    assert report["reference"] == {}
