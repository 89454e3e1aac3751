"""Scenarios from TOML files (or any mapping): one table per part of `Scenario`.

```toml
[model]
parameters = 100e9
[cluster]
machines = 64
storage_gbps = 40
[failures]
per_machine_per_day = 0.02
hardware_fraction = 0.5
[gemini]
replicas = 2
[gemini.recovery]
replacement_s = 300
```

Every key is a field of the matching dataclass in `params` (same names, same units); missing keys
keep their defaults, unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from gemini_ckpt.errors import SimulationError
from gemini_ckpt.sim.params import (
    BaselineSpec,
    ClusterSpec,
    FailureSpec,
    GeminiSpec,
    ModelSpec,
    Scenario,
    TrainingSpec,
)

_SECTIONS: dict[str, type[Any]] = {
    "model": ModelSpec,
    "cluster": ClusterSpec,
    "training": TrainingSpec,
    "failures": FailureSpec,
    "gemini": GeminiSpec,
    "baselines": BaselineSpec,
}
_T = TypeVar("_T")


def scenario_from_mapping(data: Mapping[str, Any], base: Scenario | None = None) -> Scenario:
    """Override `base` (default: the paper's scenario) with the tables of `data`.

    Raises:
        SimulationError: an unknown table or key, a value of the wrong type, or a value its
            dataclass rejects.
    """
    scenario = base or Scenario()
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise SimulationError(
            f"unknown scenario table(s) {unknown}; expected some of {sorted(_SECTIONS)}"
        )
    parts = {}
    for name in _SECTIONS:
        table = data.get(name, {})
        if not isinstance(table, Mapping):
            raise SimulationError(f"[{name}] must be a table, got {type(table).__name__}")
        parts[name] = _override(getattr(scenario, name), table, name)
    return Scenario(**parts)


def load_scenario(path: Path, base: Scenario | None = None) -> Scenario:
    """Read a TOML scenario file.

    Raises:
        SimulationError: the file cannot be read or parsed, or its values are invalid.
    """
    toml = _toml_module()
    try:
        data = toml.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SimulationError(f"cannot read scenario file {path}: {e}") from e
    except ValueError as e:  # tomllib.TOMLDecodeError is a ValueError
        raise SimulationError(f"{path} is not valid TOML: {e}") from e
    try:
        return scenario_from_mapping(data, base)
    except SimulationError as e:
        raise SimulationError(f"{path}: {e}") from e


def _toml_module() -> Any:
    for name in ("tomllib", "tomli"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise SimulationError("reading TOML needs Python >= 3.11 or the tomli package")


def _override(current: _T, table: Mapping[str, Any], where: str) -> _T:
    fields = {f.name: f for f in dataclasses.fields(current)}  # type: ignore[arg-type]
    changes: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise SimulationError(f"unknown key {where}.{key}; expected one of {sorted(fields)}")
        kind = str(fields[key].type)
        if kind == "RecoveryTimes":
            if not isinstance(value, Mapping):
                raise SimulationError(f"[{where}.{key}] must be a table")
            changes[key] = _override(getattr(current, key), value, f"{where}.{key}")
        else:
            changes[key] = _coerce(value, kind, f"{where}.{key}")
    try:
        return dataclasses.replace(current, **changes)  # type: ignore[type-var]
    except SimulationError as e:
        raise SimulationError(f"[{where}] {e}") from e


def _coerce(value: Any, kind: str, key: str) -> Any:
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind in ("float", "float | None"):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif kind == "str" and isinstance(value, str):
        return value
    raise SimulationError(f"{key} must be a {kind}, got {value!r}")
