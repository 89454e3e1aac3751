"""Benchmarks run with tiny inputs, so they cannot rot unnoticed."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_snapshot


def test_bench_snapshot_writes_json(tmp_path):
    out = tmp_path / "snapshot.json"
    report = bench_snapshot.main(
        [
            "--sizes",
            "2MiB",
            "--repeats",
            "2",
            "--chunk-size",
            "256KiB",
            "--disk-dir",
            str(tmp_path),
            "--fsdp2-sizes",
            "2MiB",
            "--out",
            str(out),
        ]
    )
    written = json.loads(out.read_text())
    assert written["results"][0]["bytes"] == report["results"][0]["bytes"] > 2_000_000
    result = written["results"][0]
    for key in (
        "plain_copy_s",
        "save_sync_s",
        "save_overlapped_blocking_s",
        "torch_save_shm_s",
        "torch_save_disk_fsync_s",
    ):
        assert len(result[key]["samples"]) == 2
        assert 0 < result[key]["min"] <= result[key]["median"]
    assert set(result["ratios"]) >= {
        "sync_vs_plain_copy",
        "sync_vs_torch_save_shm",
        "overlapped_blocking_vs_plain_copy",
    }
    assert result["meets_goals"] is None  # goals are stated for 256 MiB and 1 GiB only
    (fsdp2,) = written["fsdp2"]
    assert fsdp2["bytes"] > 2_000_000
    for rank in fsdp2["ranks"]:
        # Each rank's checkpoint holds its own half of the state, nothing gathered.
        assert rank["snapshot_is_partition"]
        assert rank["snapshot_model_optimizer_bytes"] == rank["partition_bytes"]
        assert rank["partition_bytes"] * 2 == pytest.approx(fsdp2["bytes"], rel=0.01)
        assert len(rank["save_sync_s"]["samples"]) == 2


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_snapshot_zero3_case_snapshots_each_ranks_partition_only(tmp_path):
    report = bench_snapshot.main(
        [
            "--sizes",
            "1MiB",
            "--repeats",
            "2",
            "--chunk-size",
            "256KiB",
            "--disk-dir",
            str(tmp_path),
            "--zero3-sizes",
            "8MiB",
            "--fsdp2-sizes",
            "",
            "--out",
            str(tmp_path / "snapshot.json"),
        ]
    )
    (case,) = report["zero3"]
    assert [r["rank"] for r in case["ranks"]] == [0, 1]
    for rank in case["ranks"]:
        # Half of each of: the module, the fp32 master weights and two Adam moments (plus padding
        # and the step counter): twice the model's bytes, not the 4x a gathered copy would be.
        model = rank["model_param_bytes"]
        assert 2 * model <= rank["partition_bytes"] < 2 * model + 1024
        # Besides its partition a snapshot holds only small state (RNG streams, counters).
        assert 0 <= rank["snapshot_tensor_bytes"] - rank["partition_bytes"] < 64 << 10
        assert rank["save_sync_s"]["median"] > 0 and rank["overlapped_s"]["median"] > 0
