"""Plain-text tables and JSON-ready records of simulation results (the CLI prints them)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

from gemini_ckpt.sim.analytic import Analysis
from gemini_ckpt.sim.montecarlo import WASTE, MonteCarloResult


def render_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Align columns; floats get 4 significant decimals, other values `str()`."""
    body = [[_cell(value) for value in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in body:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)


def rows_table(rows: Sequence[dict[str, Any]]) -> str:
    """A table of dict rows sharing their keys (the `paper.figure*` data)."""
    if not rows:
        return "(no rows)"
    headers = list(rows[0])
    return render_table(headers, [[row.get(h, "") for h in headers] for row in rows])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def analysis_rows(analyses: Iterable[Analysis]) -> list[dict[str, Any]]:
    """One record per strategy of the analytic model."""
    return [
        {
            "strategy": a.name,
            "effective_ratio": a.effective_ratio,
            "steady_ratio": a.steady_ratio,
            "failures_per_day": a.failures_per_day,
            "wasted_per_failure_min": a.wasted_per_failure_s / 60,
            "fallback_probability": a.fallback_probability,
        }
        for a in analyses
    ]


def monte_carlo_rows(results: Iterable[MonteCarloResult]) -> list[dict[str, Any]]:
    """One record per strategy of the simulation, with the waste breakdown in minutes per day."""
    rows = []
    for r in results:
        row: dict[str, Any] = {
            "strategy": r.name,
            "ratio_mean": r.ratio_mean,
            "ratio_low": r.ratio_low,
            "ratio_high": r.ratio_high,
            "failures_per_day": r.failures_per_day,
            "wasted_per_failure_min": r.wasted_per_failure_s / 60,
            "fallbacks": r.fallbacks,
        }
        row.update({f"{k}_min_per_day": r.waste_per_day_s[k] / 60 for k in WASTE})
        rows.append(row)
    return rows


def to_jsonable(value: Any) -> Any:
    """Dataclasses, tuples and non-finite floats in a JSON-safe shape (inf becomes null)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
