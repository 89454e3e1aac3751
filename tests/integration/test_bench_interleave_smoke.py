"""The interleave benchmark's --quick mode on the shaped test bed, so it cannot rot unnoticed.

4 machines x 1 rank of the emulated workload behind 1 gbit links, modes none and interleave, a
few iterations each (needs root and iproute2; skipped otherwise); and the same two modes with
real DeepSpeed ZeRO-3 on 2 machines over loopback.
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_interleave

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    # Two jobs each; ~90 s on an idle 2-core host, several minutes on a loaded one.
    pytest.mark.timeout(420),
    pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd missing (package etcd-server)"),
]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
needs_iproute = pytest.mark.skipif(
    shutil.which("ip") is None or shutil.which("tc") is None, reason="iproute2 (ip, tc) missing"
)


def test_deepspeed_zero3_runs_without_and_with_interleaved_checkpoints(tmp_path):
    out = tmp_path / "out"
    work = Path(tempfile.mkdtemp(prefix="gemini-ds-"))  # agent sockets need a short path
    options = ["--workload", "deepspeed", "--modes", "none,interleave", "--repeats", "1"]
    options += ["--machines", "2", "--iterations", "3", "--warmup", "2"]
    options += ["--profile-iterations", "2", "--d-model", "64", "--layers", "2", "--loopback"]
    try:
        report = bench_interleave.main([*options, "--work-dir", str(work), "--out", str(out)])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    model = "zero3-d64-l2"
    assert list(report["summary"][model]) == ["none", "interleave"]
    (none,) = report["runs"][model]["none"]
    (interleave,) = report["runs"][model]["interleave"]
    assert none["steps"] == interleave["steps"] == [5, 6, 7]
    assert "replication" not in none  # no Checkpointer at all
    replication = interleave["replication"]
    assert list(replication["steps_per_pair"]) == ["rank 0 -> machine 1", "rank 1 -> machine 0"]
    assert replication["pushes"] > 0
    # ZeRO-3: a rank pushes its own partition, never the gathered model. Whole, the state is 16
    # bytes per parameter (fp32 weights, their optimizer copy, Adam's two moments); each of 2
    # ranks holds half.
    workload = report["workload"][model]
    assert workload["checkpoint_bytes_per_rank"] < 12 * workload["parameters"]
    assert interleave["profile"]["schedules"] >= 2
    assert interleave["idle_s"]["source"] == "profile"


@needs_root
@needs_iproute
def test_quick_mode_reports_every_mode_with_measured_replication(tmp_path):
    out = tmp_path / "out"
    report = bench_interleave.main(
        ["--quick", "--work-dir", str(tmp_path / "w"), "--out", str(out)]
    )
    assert json.loads((out / "results.json").read_text()) == report
    assert [Path(f).name for f in report["figures"]] == ["gpt2-10b.png"]
    assert (out / "gpt2-10b.png").stat().st_size > 0
    summary = report["summary"]["gpt2-10b"]
    assert list(summary) == ["none", "interleave"]
    assert summary["none"]["ratio_to_none"] == {"min": 1.0, "median": 1.0}
    (none,) = report["runs"]["gpt2-10b"]["none"]
    (interleave,) = report["runs"]["gpt2-10b"]["interleave"]
    # measured iterations only: after the 2 warm-up and the 4 profiling iterations
    assert none["steps"] == interleave["steps"] == [7, 8, 9, 10, 11, 12]
    assert 0 < none["idle_s"]["median"] < none["iteration_s"]["median"]
    replication = interleave["replication"]
    # Group placement with m = 2 on 4 machines: each rank has exactly one peer.
    assert len(replication["steps_per_pair"]) == 4
    assert replication["pushes"] == sum(replication["steps_per_pair"].values()) > 0
    assert replication["checkpoint_s"]["median"] > 0
    # the whole checkpoint: tensors plus the small state (RNG, scheduler, position)
    workload = report["workload"]["gpt2-10b"]
    assert replication["bytes_per_push"] >= workload["checkpoint_bytes_per_rank"]
    assert "every_step_replicated" in summary["interleave"]
    # The profile on the shaped links: every machine scheduled, the spans' spread reported.
    profile = interleave["profile"]
    assert profile["schedules"] >= 4 and profile["spans"] >= 1
    assert 0 <= profile["spread_median"] <= profile["spread_max"]
    print(
        f"idle-span spread: median {profile['spread_median']:.3f}, max {profile['spread_max']:.3f}"
    )
    assert "every_step_replicated" not in summary["none"]
    # Every machine's commit of every measured step, with the copy's time and its deferral.
    copies = interleave["local_copy"]
    assert copies["copy_s"]["n"] == copies["deferred_s"]["n"] == 4 * len(interleave["steps"])
    assert copies["copy_s"]["median"] > 0
