"""`gemini-ckpt simulate`: wasted time and effective training time of Gemini and the baselines.

`simulate [scenario flags]` runs the analytic model and the Monte Carlo simulator on one scenario;
`simulate paper` reproduces the paper's analytic figures (9-12, 15) and the MT-NLG example.
Scenario values come from, in increasing precedence: the paper's defaults, `--config FILE.toml`,
`--measured FILE.json` (benchmark results), then flags. Every flag has a `GEMINI_SIM_*` env twin.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gemini_ckpt.config import env_default
from gemini_ckpt.errors import ConfigError, PlacementError, SimulationError
from gemini_ckpt.sim import paper, plots, stress
from gemini_ckpt.sim.analytic import analyze_all, gemini_placement
from gemini_ckpt.sim.measured import apply_measurements, load_measurements
from gemini_ckpt.sim.montecarlo import WASTE, MonteCarloConfig, MonteCarloResult, simulate
from gemini_ckpt.sim.params import Scenario
from gemini_ckpt.sim.report import (
    analysis_rows,
    monte_carlo_rows,
    render_table,
    rows_table,
    to_jsonable,
)
from gemini_ckpt.sim.scenario_file import load_scenario, scenario_from_mapping

ENV_PREFIX = "GEMINI_SIM_"
_G, _GR, _BR = "gemini", "gemini.recovery", "baselines.recovery"

# flag, type, targets (table, key), help
_SCENARIO_FLAGS: tuple[tuple[str, type, tuple[tuple[str, str], ...], str], ...] = (
    ("--machines", int, (("cluster", "machines"),), "N, training machines"),
    ("--gpus-per-machine", int, (("cluster", "gpus_per_machine"),), "GPUs per machine"),
    ("--cpu-memory-gb", float, (("cluster", "cpu_memory_gb"),), "CPU memory per machine, GB"),
    ("--network-gbps", float, (("cluster", "network_gbps"),), "per-machine network, Gbps"),
    ("--network-efficiency", float, (("cluster", "network_efficiency"),), "achieved fraction"),
    ("--storage-gbps", float, (("cluster", "storage_gbps"),), "aggregate storage, Gbps"),
    ("--parameters", float, (("model", "parameters"),), "model parameters, e.g. 100e9"),
    ("--bytes-per-parameter", float, (("model", "bytes_per_parameter"),), "checkpoint bytes"),
    ("--iteration-s", float, (("training", "iteration_s"),), "T_iter, seconds"),
    ("--idle-network-s", float, (("training", "idle_network_s"),), "idle network s/iteration"),
    ("--snapshot-blocking-s", float, (("training", "snapshot_blocking_s"),), "blocking/ckpt"),
    ("--failure-rate", float, (("failures", "per_machine_per_day"),), "failures/machine/day"),
    ("--hardware-fraction", float, (("failures", "hardware_fraction"),), "share losing memory"),
    ("--domain-size", int, (("failures", "domain_size"),), "machines per failure domain"),
    ("--domain-failures-per-day", float, (("failures", "domain_failures_per_day"),), "per domain"),
    ("--replicas", int, ((_G, "replicas"),), "m, in-memory copies per checkpoint"),
    ("--placement", str, ((_G, "placement"),), "mixed | group | ring"),
    ("--interval-iterations", int, ((_G, "interval_iterations"),), "0 = fit the idle time"),
    ("--persistent-interval-s", float, ((_G, "persistent_interval_s"),), "Gemini's remote"),
    ("--detection-s", float, ((_GR, "detection_s"),), "Gemini failure detection, s"),
    ("--serialization-s", float, ((_GR, "serialization_s"),), "Gemini serialisation, s"),
    ("--restart-s", float, ((_GR, "restart_s"),), "Gemini restart and warm-up, s"),
    ("--replacement-s", float, ((_GR, "replacement_s"), (_BR, "replacement_s")), "new machine"),
    ("--baseline-restart-s", float, ((_BR, "restart_s"),), "baselines' restart, s"),
    ("--strawman-interval-s", float, (("baselines", "strawman_interval_s"),), "Strawman 1/f"),
    ("--highfreq-blocking-s", float, (("baselines", "highfreq_blocking_s"),), "HighFreq block"),
)
_BOOL_FLAGS = (
    ("--domain-aware", ((_G, "domain_aware"),), "spread groups over failure domains"),
    ("--align-iterations", (("baselines", "align_to_iterations"),), "HighFreq whole iterations"),
)


def env_name(flag: str) -> str:
    """The environment twin of a flag: `--machines` -> `GEMINI_SIM_MACHINES`."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def env_bool(flag: str) -> bool:
    """A boolean flag's default from its env twin (1/true/yes/on)."""
    value = env_default(env_name(flag)) or ""
    return value.strip().lower() in ("1", "true", "yes", "on")


def add_flag(parser: Any, flag: str, **kwargs: Any) -> None:
    """Add a flag whose default is read from its `GEMINI_SIM_*` twin (or `default`)."""
    fallback = kwargs.pop("default", None)
    default = env_default(env_name(flag), None if fallback is None else str(fallback))
    help_text = kwargs.pop("help", "")
    parser.add_argument(flag, default=default, help=f"{help_text} (env {env_name(flag)})", **kwargs)


def add_output_flags(parser: argparse.ArgumentParser, plot: bool = True) -> None:
    """`-o table|json` and optionally `--plot DIR`."""
    default = env_default(env_name("--output"), "table")
    parser.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default=default,
        help=f"output format (env {env_name('--output')})",
    )
    if plot:
        add_flag(parser, "--plot", type=Path, metavar="DIR", help="write PNG figures to DIR")


def add_scenario_flags(parser: argparse.ArgumentParser) -> None:
    """The scenario flags shared by `simulate` and `recommend`."""
    group = parser.add_argument_group("scenario (defaults: the paper's GPT-2 100B on 16 p4d)")
    add_flag(group, "--config", type=Path, metavar="FILE.toml", help="scenario TOML file")
    add_flag(
        group,
        "--measured",
        metavar="FILE.json[,FILE.json]",
        help="benchmark JSON files with measured inputs",
    )
    add_flag(
        group,
        "--failures-per-day",
        type=float,
        help="failures per day in the whole cluster (instead of --failure-rate)",
    )
    for flag, kind, _, help_text in _SCENARIO_FLAGS:
        add_flag(group, flag, type=kind, help=help_text)
    for flag, _, help_text in _BOOL_FLAGS:
        group.add_argument(
            flag,
            action="store_true",
            default=env_bool(flag),
            help=f"{help_text} (env {env_name(flag)})",
        )


def scenario_from_args(args: argparse.Namespace) -> tuple[Scenario, list[str]]:
    """Build the scenario: defaults, then --config, then --measured, then flags.

    Raises:
        ConfigError: any invalid value, naming where it came from.
    """
    try:
        scenario = load_scenario(args.config) if args.config else Scenario()
        notes: list[str] = []
        if args.measured:
            paths = [Path(p) for p in str(args.measured).split(",") if p]
            scenario, notes = apply_measurements(scenario, load_measurements(paths))
        data: dict[str, Any] = {}
        for flag, _, targets, _ in _SCENARIO_FLAGS:
            _put(data, targets, getattr(args, _dest(flag)))
        for flag, targets, _ in _BOOL_FLAGS:
            _put(data, targets, True if getattr(args, _dest(flag)) else None)
        if args.failures_per_day is not None:
            if args.failure_rate is not None:
                raise SimulationError("give --failures-per-day or --failure-rate, not both")
            machines = data.get("cluster", {}).get("machines", scenario.cluster.machines)
            _put(data, (("failures", "per_machine_per_day"),), args.failures_per_day / machines)
        return scenario_from_mapping(data, scenario), notes
    except (SimulationError, PlacementError) as e:
        raise ConfigError(str(e)) from e


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _put(data: dict[str, Any], targets: tuple[tuple[str, str], ...], value: Any) -> None:
    if value is None:
        return
    for path, key in targets:
        table = data
        for part in path.split("."):
            table = table.setdefault(part, {})
        table[key] = value


def monte_carlo_config(args: argparse.Namespace) -> MonteCarloConfig:
    """The simulation settings from `--days --runs --seed --confidence`."""
    try:
        return MonteCarloConfig(
            days=args.days, runs=args.runs, seed=args.seed, confidence=args.confidence
        )
    except SimulationError as e:
        raise ConfigError(str(e)) from e


def add_parser(subparsers: Any) -> None:
    """Register `simulate`."""
    p = subparsers.add_parser(
        "simulate",
        help="wasted time and effective training time of Gemini vs remote checkpoints",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "preset",
        nargs="?",
        choices=("paper",),
        help="`paper`: reproduce the paper's figures instead of one scenario",
    )
    add_scenario_flags(p)
    sim = p.add_argument_group("Monte Carlo")
    add_flag(sim, "--days", type=float, default=30.0, help="days per simulated run")
    add_flag(sim, "--runs", type=int, default=20, help="independent runs")
    add_flag(sim, "--seed", type=int, default=0, help="random seed")
    add_flag(sim, "--confidence", type=float, default=0.95, help="CI level")
    sim.add_argument(
        "--no-monte-carlo",
        action="store_true",
        default=env_bool("--no-monte-carlo"),
        help=f"analytic model only (env {env_name('--no-monte-carlo')})",
    )
    add_output_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run `simulate` or `simulate paper`."""
    mc = None if args.no_monte_carlo else monte_carlo_config(args)
    if args.preset == "paper":
        return _run_paper(args, mc)
    scenario, notes = scenario_from_args(args)
    try:
        _, reason = gemini_placement(scenario, scenario.gemini.replicas)
        analytic = analysis_rows(analyze_all(scenario))
        results = simulate(scenario, mc) if mc else ()
    except (SimulationError, PlacementError) as e:
        raise ConfigError(str(e)) from e
    if args.output == "json":
        doc = {
            "scenario": to_jsonable(scenario),
            "measured": notes,
            "placement": reason,
            "analytic": analytic,
            "monte_carlo": monte_carlo_rows(results),
        }
        print(json.dumps(doc, indent=2))
    else:
        for note in notes:
            print(f"measured: {note}")
        print(f"placement: {reason}")
        print(f"failures per day: {scenario.failures_per_day:.4g}\n\nAnalytic model (Eq. 1-2):")
        print(rows_table(analytic))
        if results and mc is not None:
            print(
                f"\nMonte Carlo ({mc.runs} runs x {mc.days:g} days, seed {mc.seed}, "
                f"{mc.confidence:.0%} CI):"
            )
            print(_mc_table(monte_carlo_rows(results), mc.confidence))
            print("\nWasted minutes per day, by cause (Monte Carlo):")
            print(_waste_table(results))
    if args.plot and results:
        _wrote(args, [plots.plot_breakdown(results, args.plot)])
    return 0


def _wrote(args: argparse.Namespace, paths: list[Path]) -> None:
    """Name the files written: on stderr when stdout carries JSON."""
    for path in paths:
        print(f"wrote {path}", file=sys.stderr if args.output == "json" else sys.stdout)


def _waste_table(results: tuple[MonteCarloResult, ...]) -> str:
    rows = [[r.name, *(r.waste_per_day_s[k] / 60 for k in WASTE)] for r in results]
    return render_table(["strategy", *WASTE], rows)


def _mc_table(rows: list[dict[str, Any]], confidence: float) -> str:
    headers = [
        "strategy",
        "ratio",
        f"{confidence:.0%} CI",
        "failures/day",
        "wasted/failure min",
        "fallbacks",
    ]
    body = [
        [
            r["strategy"],
            r["ratio_mean"],
            f"{r['ratio_low']:.4f}..{r['ratio_high']:.4f}",
            r["failures_per_day"],
            r["wasted_per_failure_min"],
            r["fallbacks"],
        ]
        for r in rows
    ]
    return render_table(headers, body)


def _run_paper(args: argparse.Namespace, mc: MonteCarloConfig | None) -> int:
    figures = {
        "figure9": paper.figure9(),
        "mt_nlg": [paper.mt_nlg_wasted()],
        "figure10": paper.figure10(),
        "figure11": paper.figure11(),
        "figure12": paper.figure12(),
        "figure15a": paper.figure15a(monte_carlo=mc),
        "figure15b": paper.figure15b(monte_carlo=mc),
    }
    if mc is not None:
        figures["correlated_failures"] = stress.correlated_failures(config=mc)
        figures["group_loss"] = stress.long_repairs(config=mc)
    if args.output == "json":
        print(json.dumps(to_jsonable(figures), indent=2))
    else:
        shown = dict(figures)
        shown["figure9"] = [r for r in figures["figure9"] if r["machines"] in (16, 17, 32, 64, 128)]
        for name, rows in shown.items():
            print(f"{name}:\n{rows_table(rows)}\n")
    if args.plot:
        out: Path = args.plot
        written = [
            plots.plot_figure9(figures["figure9"], out),
            plots.plot_figure11(figures["figure11"], out),
            plots.plot_figure12(figures["figure12"], out),
            plots.plot_ratios(
                figures["figure15a"],
                "failures_per_day",
                "Figure 15a (16 machines)",
                out,
                "fig15a_ratio_vs_failures.png",
            ),
            plots.plot_ratios(
                figures["figure15b"],
                "machines",
                "Figure 15b (1.5 %/machine/day)",
                out,
                "fig15b_ratio_vs_machines.png",
            ),
        ]
        if mc is not None:
            written.append(
                plots.plot_assumptions(figures["correlated_failures"], figures["group_loss"], out)
            )
        _wrote(args, written)
    return 0
