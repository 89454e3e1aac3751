"""`gemini-ckpt recommend`: the checkpoint interval and replica count m to use, with the reasoning.

Takes the same scenario flags as `simulate` (defaults: the paper's setting); every flag has a
`GEMINI_SIM_*` env twin.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from gemini_ckpt.cli.simulate_cmd import (
    add_flag,
    add_output_flags,
    add_scenario_flags,
    scenario_from_args,
)
from gemini_ckpt.errors import ConfigError, PlacementError, SimulationError
from gemini_ckpt.sim.recommend import recommend
from gemini_ckpt.sim.report import render_table, to_jsonable


def add_parser(subparsers: Any) -> None:
    """Register `recommend`."""
    p = subparsers.add_parser(
        "recommend",
        help="choose the checkpoint interval and replica count under a CPU-memory budget",
        description=__doc__,
    )
    add_flag(
        p,
        "--memory-budget-gb",
        type=float,
        help="CPU memory per machine for replicas, GB (default: --cpu-memory-gb)",
    )
    add_flag(p, "--max-replicas", type=int, default=4, help="largest m to consider")
    add_flag(
        p,
        "--max-interval-iterations",
        type=int,
        default=1000,
        help="longest checkpoint interval to consider",
    )
    add_scenario_flags(p)
    add_output_flags(p, plot=False)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the recommendation and why."""
    scenario, notes = scenario_from_args(args)
    try:
        decision, reason = recommend(
            scenario, args.memory_budget_gb, args.max_replicas, args.max_interval_iterations
        )
    except (SimulationError, PlacementError) as e:
        raise ConfigError(str(e)) from e
    if args.output == "json":
        doc = {
            "recommendation": to_jsonable(decision),
            "reason": reason.splitlines(),
            "measured": notes,
        }
        print(json.dumps(doc, indent=2))
        return 0
    for note in notes:
        print(f"measured: {note}")
    print(reason)
    rows = [
        [
            c.replicas,
            f"{c.memory_gb:.0f}",
            "yes" if c.fits else "no",
            c.interval_iterations,
            c.effective_ratio,
            c.fallback_probability,
        ]
        for c in decision.candidates
    ]
    headers = ["m", "memory GB", "fits", "interval it", "ratio", "P(fallback)"]
    print("\n" + render_table(headers, rows))
    return 0
