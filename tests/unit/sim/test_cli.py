"""Smoke tests of `gemini-ckpt simulate | recommend | placement` through the real entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemini_ckpt.cli import main as cli

MINE = (
    "gemini_ckpt.cli.simulate_cmd",
    "gemini_ckpt.cli.recommend_cmd",
    "gemini_ckpt.cli.placement_cmd",
)


@pytest.fixture(autouse=True)
def _only_simulator_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep these tests about the simulator's commands, whatever state the others are in."""
    assert set(MINE) <= set(cli._COMMAND_MODULES)
    monkeypatch.setattr(cli, "_COMMAND_MODULES", MINE)


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_placement_json(capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(capsys, ["placement", "--machines", "5", "--replicas", "2", "-o", "json"])
    assert doc["groups"] == [[0, 1], [2, 3, 4]]
    assert doc["holders"][4] == [4, 2]
    by_k = {r["failures"]: r for r in doc["probabilities"]}
    assert by_k[2]["recover"] == pytest.approx(0.6)
    assert by_k[2]["theorem1_bound"] == pytest.approx(0.7)


def test_placement_table_with_domains(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["placement", "--machines", "8", "--replicas", "2", "--domain-size", "4"]
    assert cli.main([*argv, "--failures", "2,3"]) == 0
    out = capsys.readouterr().out
    assert "every holder set spans 2 distinct domains" in out
    assert "0.8571" in out  # 1 - 4/C(8,2)


def test_env_twins_set_defaults(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMINI_SIM_MACHINES", "6")
    monkeypatch.setenv("GEMINI_SIM_OUTPUT", "json")
    doc = _json(capsys, ["placement", "--replicas", "3"])
    assert doc["groups"] == [[0, 1, 2], [3, 4, 5]]


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["placement", "--machines", "3", "--replicas", "5"]) == 2
    assert "m=5 replicas need at least 5 machines" in capsys.readouterr().err
    assert cli.main(["simulate", "--failure-rate", "-1", "--no-monte-carlo"]) == 2
    assert "per_machine_per_day must be >= 0" in capsys.readouterr().err


def test_simulate_scenario_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "s.toml"
    config.write_text("[cluster]\nmachines = 32\n")
    measured = tmp_path / "bench.json"
    measured.write_text(json.dumps({"recovery_s": 2.0}))
    argv = [
        "simulate",
        "--config",
        str(config),
        "--measured",
        str(measured),
        "--failures-per-day",
        "4",
        "--hardware-fraction",
        "0.5",
        "--runs",
        "3",
        "--days",
        "5",
        "-o",
        "json",
    ]
    doc = _json(capsys, argv)
    assert doc["scenario"]["cluster"]["machines"] == 32
    assert doc["scenario"]["failures"]["per_machine_per_day"] == pytest.approx(4 / 32)
    assert doc["measured"] == [f"recovery_s = 2 from {measured}"]
    names = [r["strategy"] for r in doc["monte_carlo"]]
    assert names == ["gemini", "strawman", "highfreq"]
    gemini = doc["monte_carlo"][0]
    assert gemini["ratio_low"] <= gemini["ratio_mean"] <= gemini["ratio_high"]


def test_simulate_paper_writes_the_figures(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["simulate", "paper", "--runs", "2", "--days", "2", "--plot", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "figure15a:" in out
    assert "correlated_failures:" in out
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == [
        "assumptions.png",
        "fig11_checkpoint_time_reduction.png",
        "fig12_checkpoint_frequency.png",
        "fig15a_ratio_vs_failures.png",
        "fig15b_ratio_vs_machines.png",
        "fig9_recovery_probability.png",
    ]
    assert all(p.stat().st_size > 1000 for p in tmp_path.glob("*.png"))


def test_simulate_paper_json_matches_the_paper(capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(capsys, ["simulate", "paper", "--no-monte-carlo", "-o", "json"])
    row = next(r for r in doc["figure15b"] if r["machines"] == 1000)
    assert row["gemini"] == pytest.approx(0.906, abs=0.005)
    assert doc["mt_nlg"][0]["wasted_rounded_min"] == 105
    assert "correlated_failures" not in doc


def test_recommend(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "recommend",
        "--hardware-fraction",
        "0.5",
        "--failure-rate",
        "0.05",
        "--replacement-s",
        "3600",
        "--memory-budget-gb",
        "400",
        "-o",
        "json",
    ]
    doc = _json(capsys, argv)
    assert doc["recommendation"]["replicas"] == 2
    assert any(line.startswith("Chosen: m=2") for line in doc["reason"])
    assert cli.main(["recommend", "--memory-budget-gb", "400"]) == 0
    assert "Chosen:" in capsys.readouterr().out
