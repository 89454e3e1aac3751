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
    for key in bench_replication.MEASURES:
        assert len(result[key]["samples"]) == 1
        assert 0 < result[key]["min"] <= result[key]["median"]
        assert len(result["first_repeats_s"][key]) == 2
    assert "fetch_kept_mapped_s" in bench_replication.MEASURES
    for key in (
        "replication_vs_raw",
        "retrieval_vs_raw",
        "retrieval_kept_mapped_vs_raw",
        "retrieval_alt_streams_vs_raw",
    ):
        assert result["ratios"][key]["min"] > 0
    assert set(result["meets_goals"]) == {"retrieval", "retrieval_kept_mapped"}
    assert written["settings"]["streams"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replication.json"]  # nothing left
