"""The replication benchmark runs with tiny inputs, so it cannot rot unnoticed."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_replication

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_bench_replication_writes_json(tmp_path):
    out = tmp_path / "replication.json"
    report = bench_replication.main(
        [
            "--sizes",
            "1MiB",
            "--repeats",
            "1",
            "--chunk-size",
            "256KiB",
            "--streams",
            "2",
            "--alt-streams",
            "1",
            "--shm-dir",
            str(tmp_path),
            "--out",
            str(out),
        ]
    )
    written = json.loads(out.read_text())
    assert written["results"][0]["bytes"] == report["results"][0]["bytes"] == 1 << 20
    result = written["results"][0]
    for key in ("raw_push_s", "push_s", "raw_fetch_s", "fetch_s", "fetch_alt_streams_s"):
        assert len(result[key]["samples"]) == 1
        assert 0 < result[key]["min"] <= result[key]["median"]
        assert len(result["first_repeats_s"][key]) == 2
    for key in ("replication_vs_raw", "retrieval_vs_raw", "retrieval_alt_streams_vs_raw"):
        assert result["ratios"][key]["min"] > 0
    assert isinstance(result["meets_goals"], bool)
    assert written["settings"]["streams"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replication.json"]  # nothing left
