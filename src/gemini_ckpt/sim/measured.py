"""Measured inputs: benchmark JSON files that replace the model's assumptions with measurements.

Schema (version 1). A file holds one JSON object. The simulator reads the optional fields below,
either at the top level or inside a `"gemini_sim"` object (so a benchmark can embed them next to its
own results); every other key is ignored. Later files override earlier ones field by field.

| field | unit | meaning | replaces |
|---|---|---|---|
| `snapshot_blocking_s` | s | training blocked per checkpoint | `training.snapshot_blocking_s` |
| `replication_gbps` | Gbps | achieved replication rate | `cluster.network_gbps` (eff. 1) |
| `recovery_s` | s | restore from a peer's memory | `gemini.peer_retrieval_s` |
| `iteration_s` | s | training iteration time | `training.iteration_s` |
| `idle_network_s` | s | idle network per iteration | `training.idle_network_s` |
| `checkpoint_bytes` | bytes | the job's whole checkpoint | `model.parameters` (at its B/param) |
| `storage_gbps` | Gbps | aggregate storage bandwidth | `cluster.storage_gbps` |
| `detection_s` | s | failure detection | `gemini.recovery.detection_s` |
| `restart_s` | s | restart and warm-up | `gemini.recovery.restart_s` |

```json
{"schema": 1, "snapshot_blocking_s": 0.004, "replication_gbps": 9.6, "recovery_s": 2.1}
```

A field of the wrong type or out of range is an error naming the file and the field; a missing field
keeps the scenario's value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gemini_ckpt.errors import SimulationError
from gemini_ckpt.sim.params import Scenario

SCHEMA_VERSION = 1
FIELDS = (
    "snapshot_blocking_s",
    "replication_gbps",
    "recovery_s",
    "iteration_s",
    "idle_network_s",
    "checkpoint_bytes",
    "storage_gbps",
    "detection_s",
    "restart_s",
)
_POSITIVE = frozenset({"replication_gbps", "iteration_s", "checkpoint_bytes", "storage_gbps"})


@dataclass(frozen=True)
class Measurements:
    """Measured values by field name, and the file each one came from."""

    values: dict[str, float] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


def parse_measurements(data: Any, source: str) -> Measurements:
    """Validate one decoded JSON document.

    Raises:
        SimulationError: the document is not an object, has an unsupported `schema`, or a known
            field is not a finite number in range.
    """
    if not isinstance(data, Mapping):
        raise SimulationError(f"{source}: expected a JSON object, got {type(data).__name__}")
    schema = data.get("schema", SCHEMA_VERSION)
    if schema != SCHEMA_VERSION:
        raise SimulationError(f"{source}: schema {schema!r} is not supported (expected 1)")
    section = data.get("gemini_sim", data)
    if not isinstance(section, Mapping):
        raise SimulationError(f'{source}: "gemini_sim" must be an object')
    values: dict[str, float] = {}
    for name in FIELDS:
        if name not in section:
            continue
        value = section[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SimulationError(f"{source}: {name} must be a number, got {value!r}")
        number = float(value)
        low_ok = number > 0 if name in _POSITIVE else number >= 0
        if not (math.isfinite(number) and low_ok):
            bound = "> 0" if name in _POSITIVE else ">= 0"
            raise SimulationError(f"{source}: {name} must be finite and {bound}, got {value!r}")
        values[name] = number
    return Measurements(values, dict.fromkeys(values, source))


def load_measurements(paths: Iterable[Path]) -> Measurements:
    """Read and merge benchmark JSON files; later files win.

    Raises:
        SimulationError: a file cannot be read, is not JSON, or fails `parse_measurements`.
    """
    values: dict[str, float] = {}
    sources: dict[str, str] = {}
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise SimulationError(f"cannot read measurements {path}: {e}") from e
        except json.JSONDecodeError as e:
            raise SimulationError(f"{path} is not valid JSON: {e}") from e
        found = parse_measurements(data, str(path))
        values.update(found.values)
        sources.update(found.sources)
    return Measurements(values, sources)


def apply_measurements(scenario: Scenario, measured: Measurements) -> tuple[Scenario, list[str]]:
    """Put measured values into a scenario.

    Returns:
        The new scenario and one note per field used ("replication_gbps = 9.6 from bench.json").
    """
    v = measured.values
    s = scenario
    training = replace(
        s.training,
        snapshot_blocking_s=v.get("snapshot_blocking_s", s.training.snapshot_blocking_s),
        iteration_s=v.get("iteration_s", s.training.iteration_s),
        idle_network_s=v.get("idle_network_s", s.training.idle_network_s),
    )
    cluster = replace(s.cluster, storage_gbps=v.get("storage_gbps", s.cluster.storage_gbps))
    if "replication_gbps" in v:
        cluster = replace(cluster, network_gbps=v["replication_gbps"], network_efficiency=1.0)
    model = s.model
    if "checkpoint_bytes" in v:
        model = replace(model, parameters=v["checkpoint_bytes"] / model.bytes_per_parameter)
    recovery = replace(
        s.gemini.recovery,
        detection_s=v.get("detection_s", s.gemini.recovery.detection_s),
        restart_s=v.get("restart_s", s.gemini.recovery.restart_s),
    )
    gemini = replace(
        s.gemini,
        recovery=recovery,
        peer_retrieval_s=v.get("recovery_s", s.gemini.peer_retrieval_s),
    )
    notes = [f"{name} = {v[name]:g} from {measured.sources[name]}" for name in FIELDS if name in v]
    new = replace(s, model=model, cluster=cluster, training=training, gemini=gemini)
    return new, notes
