"""Scenario TOML files and measured-input JSON files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemini_ckpt.errors import SimulationError
from gemini_ckpt.sim.analytic import peer_retrieval_s, strategy_timings
from gemini_ckpt.sim.measured import apply_measurements, load_measurements, parse_measurements
from gemini_ckpt.sim.params import Scenario
from gemini_ckpt.sim.scenario_file import load_scenario, scenario_from_mapping


def test_toml_overrides_defaults(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        "[cluster]\nmachines = 64\nstorage_gbps = 40\n"
        "[failures]\nper_machine_per_day = 0.02\nhardware_fraction = 0.5\n"
        "[gemini]\nreplicas = 3\nplacement = 'ring'\n[gemini.recovery]\nreplacement_s = 300\n"
    )
    s = load_scenario(path)
    assert (s.cluster.machines, s.cluster.storage_gbps) == (64, 40.0)
    assert (s.gemini.replicas, s.gemini.placement) == (3, "ring")
    assert s.gemini.recovery.replacement_s == 300
    assert s.gemini.recovery.restart_s == 253  # untouched keys keep their defaults
    assert s.model == Scenario().model


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"clusters": {}}, "unknown scenario table"),
        ({"cluster": {"nodes": 4}}, "unknown key cluster.nodes"),
        ({"cluster": {"machines": "four"}}, "cluster.machines must be a int"),
        ({"cluster": {"machines": 2.5}}, "cluster.machines must be a int"),
        ({"gemini": {"domain_aware": 1}}, "gemini.domain_aware must be a bool"),
        ({"cluster": {"machines": 0}}, r"\[cluster\] machines must be >= 1"),
        ({"gemini": {"recovery": 5}}, r"\[gemini.recovery\] must be a table"),
    ],
)
def test_bad_scenarios_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(SimulationError, match=message):
        scenario_from_mapping(data)


def test_bad_toml_files(tmp_path: Path) -> None:
    with pytest.raises(SimulationError, match="cannot read scenario file"):
        load_scenario(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[cluster\nmachines = ")
    with pytest.raises(SimulationError, match="not valid TOML"):
        load_scenario(broken)


def test_measurements_replace_assumptions(tmp_path: Path) -> None:
    snap = tmp_path / "snapshot.json"
    snap.write_text(json.dumps({"schema": 1, "snapshot_blocking_s": 0.5, "other": [1, 2]}))
    repl = tmp_path / "replication.json"
    repl.write_text(json.dumps({"gemini_sim": {"replication_gbps": 100, "recovery_s": 2.5}}))
    measured = load_measurements([snap, repl])
    s, notes = apply_measurements(Scenario(), measured)
    assert s.training.snapshot_blocking_s == 0.5
    assert (s.cluster.network_gbps, s.cluster.network_efficiency) == (100, 1.0)
    assert peer_retrieval_s(s) == 2.5
    assert strategy_timings(s)[0].blocking_s == pytest.approx(0.5)
    assert notes == [
        f"snapshot_blocking_s = 0.5 from {snap}",
        f"replication_gbps = 100 from {repl}",
        f"recovery_s = 2.5 from {repl}",
    ]


def test_missing_fields_keep_the_scenario() -> None:
    s, notes = apply_measurements(Scenario(), parse_measurements({"unrelated": 1}, "x.json"))
    assert (s, notes) == (Scenario(), [])
    size, _ = apply_measurements(Scenario(), parse_measurements({"checkpoint_bytes": 6e11}, "x"))
    assert size.model.checkpoint_bytes == pytest.approx(6e11)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], "expected a JSON object"),
        ({"schema": 2}, "schema 2 is not supported"),
        ({"replication_gbps": "fast"}, "replication_gbps must be a number"),
        ({"replication_gbps": 0}, "replication_gbps must be finite and > 0"),
        ({"recovery_s": -1}, "recovery_s must be finite and >= 0"),
        ({"snapshot_blocking_s": True}, "snapshot_blocking_s must be a number"),
        ({"gemini_sim": 3}, "must be an object"),
    ],
)
def test_malformed_measurements_are_clear_errors(data: object, message: str) -> None:
    with pytest.raises(SimulationError, match=message):
        parse_measurements(data, "bench.json")


def test_unreadable_measurement_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SimulationError, match=r"bad\.json is not valid JSON"):
        load_measurements([bad])
    with pytest.raises(SimulationError, match="cannot read measurements"):
        load_measurements([tmp_path / "none.json"])
