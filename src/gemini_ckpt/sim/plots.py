"""PNG figures with matplotlib (the optional `plot` extra), imported only when a plot is asked for.

Each function takes the rows of `paper.figure*` (or simulation results) and a directory, writes one
small PNG with the Agg backend, and returns its path.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gemini_ckpt.errors import SimulationError
from gemini_ckpt.sim.montecarlo import WASTE, MonteCarloResult

_SIZE = (5.0, 3.2)
_DPI = 80
_STRATEGIES = ("gemini", "strawman", "highfreq")


def _pyplot() -> Any:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ModuleNotFoundError as e:
        raise SimulationError("--plot needs matplotlib: pip install 'gemini-ckpt[plot]'") from e
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def _save(plt: Any, fig: Any, directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def plot_figure9(rows: Sequence[dict[str, Any]], directory: Path) -> Path:
    """Recovery probability against N: mixed/group and ring placement, exact and notebook ring."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=_SIZE)
    n = [r["machines"] for r in rows]
    for key, label, style in (
        ("group_k2", "Gemini m=2, k=2", "-"),
        ("group_k3", "Gemini m=2, k=3", "-"),
        ("ring_k2", "Ring m=2, k=2", "--"),
        ("ring_k3", "Ring m=2, k=3 (exact)", "--"),
        ("ring_formula_k3", "Ring k=3 (paper's formula)", ":"),
    ):
        ax.plot(n, [r[key] for r in rows], style, label=label)
    ax.set(xlabel="machines N", ylabel="P(recover from memory)", title="Figure 9")
    ax.legend(fontsize=7)
    return _save(plt, fig, directory, "fig9_recovery_probability.png")


def plot_figure11(rows: Sequence[dict[str, Any]], directory: Path) -> Path:
    """Checkpoint-time reduction against N for each instance bandwidth."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=_SIZE)
    n = [r["machines"] for r in rows]
    for key in [k for k in rows[0] if k.endswith("gbps")]:
        ax.plot(n, [r[key] for r in rows], "o-", label=key.replace("gbps", " Gbps"))
    ax.set(xlabel="machines N", ylabel="reduction (x)", title="Figure 11")
    ax.legend(fontsize=7)
    return _save(plt, fig, directory, "fig11_checkpoint_time_reduction.png")


def plot_figure12(rows: Sequence[dict[str, Any]], directory: Path) -> Path:
    """Checkpoints per hour of each strategy (log scale)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=_SIZE)
    names = [r["strategy"] for r in rows]
    values = [r["per_hour"] for r in rows]
    ax.bar(names, values)
    ax.set_yscale("log")
    for x, v in enumerate(values):
        ax.annotate(f"{v:.2f}", (x, v), ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="checkpoints per hour", title="Figure 12")
    return _save(plt, fig, directory, "fig12_checkpoint_frequency.png")


def plot_ratios(
    rows: Sequence[dict[str, Any]], x_key: str, title: str, directory: Path, name: str
) -> Path:
    """Effective training time ratio: the analytic model as lines, Monte Carlo means with CIs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=_SIZE)
    x = [r[x_key] for r in rows]
    for strategy in _STRATEGIES:
        (line,) = ax.plot(x, [r[strategy] for r in rows], "-", label=f"{strategy} (model)")
        if f"{strategy}_mc" in rows[0]:
            key = f"{strategy}_mc"
            _errorbars(ax, x, rows, key, f"{strategy} (Monte Carlo)", line.get_color())
    ax.set(xlabel=x_key.replace("_", " "), ylabel="effective training time ratio", title=title)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=6)
    return _save(plt, fig, directory, name)


def plot_breakdown(results: Sequence[MonteCarloResult], directory: Path) -> Path:
    """Where each strategy's wasted time goes, minutes per day (stacked bars)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=_SIZE)
    names = [r.name for r in results]
    bottom = [0.0] * len(results)
    for key in WASTE:
        values = [r.waste_per_day_s[key] / 60 for r in results]
        ax.bar(names, values, bottom=bottom, label=key)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set(ylabel="wasted minutes per day", title="Wasted time by cause (Monte Carlo)")
    ax.legend(fontsize=6)
    return _save(plt, fig, directory, "wasted_time_breakdown.png")


def plot_assumptions(
    correlated: Sequence[dict[str, Any]], repairs: Sequence[dict[str, Any]], directory: Path
) -> Path:
    """Gemini where the paper's assumptions fail: rack failures and k >= m in one group."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.0, 3.2))
    x = [r["rack_failures_per_day"] for r in correlated]
    left.plot(x, [r["model"] for r in correlated], "-", label="model")
    for key, label in (
        ("mc_grouped", "MC, group placement"),
        ("mc_domain_aware", "MC, rack-aware"),
    ):
        _errorbars(left, x, correlated, key, label)
    left.set(
        xlabel="rack failures per rack per day",
        ylabel="Gemini effective ratio",
        title="Correlated failures (racks of 4)",
    )
    left.legend(fontsize=6)
    x = [r["replacement_min"] for r in repairs]
    right.plot(x, [r["model_paper"] for r in repairs], "-", label="paper's model")
    right.plot(x, [r["model_group_loss"] for r in repairs], "--", label="model + group loss")
    _errorbars(right, x, repairs, "mc", "Monte Carlo")
    right.set(xlabel="replacement time (min)", title="k >= m in one group (N=8)")
    right.legend(fontsize=6)
    return _save(plt, fig, directory, "assumptions.png")


def _errorbars(
    ax: Any,
    x: list[Any],
    rows: Sequence[dict[str, Any]],
    key: str,
    label: str,
    color: str | None = None,
) -> None:
    mean = [r[key] for r in rows]
    err = [
        [m - r[f"{key}_low"] for m, r in zip(mean, rows, strict=True)],
        [r[f"{key}_high"] - m for m, r in zip(mean, rows, strict=True)],
    ]
    ax.errorbar(x, mean, yerr=err, fmt="o", ms=3, capsize=2, color=color, label=label)
