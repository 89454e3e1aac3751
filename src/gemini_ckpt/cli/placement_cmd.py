"""`gemini-ckpt placement`: who holds whose checkpoint, and the chance to recover from memory.

Shows the layout for N machines and m replicas (mixed placement by default: groups of m, with a
ring in the last group when m does not divide N) and the exact probability that every checkpoint
survives k simultaneous failures, next to ring placement and Theorem 1's bound. Every flag has a
`GEMINI_SIM_*` env twin.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from gemini_ckpt.cli.simulate_cmd import add_flag, add_output_flags
from gemini_ckpt.errors import ConfigError, PlacementError
from gemini_ckpt.placement import (
    STRATEGIES,
    Placement,
    place,
    recovery_probability,
    ring_placement,
    theorem1_upper_bound,
)
from gemini_ckpt.sim.report import render_table


def add_parser(subparsers: Any) -> None:
    """Register `placement`."""
    p = subparsers.add_parser(
        "placement",
        help="show a checkpoint placement and its recovery probabilities",
        description=__doc__,
    )
    add_flag(p, "--machines", type=int, default=16, help="N, machines")
    add_flag(p, "--replicas", type=int, default=2, help="m, copies per checkpoint")
    add_flag(
        p,
        "--failures",
        type=str,
        metavar="K[,K...]",
        help="simultaneous failures to evaluate (default: 1..m+1)",
    )
    add_flag(p, "--strategy", choices=STRATEGIES, default="mixed", help="placement strategy")
    add_flag(
        p,
        "--domains",
        type=str,
        metavar="LABEL,...",
        help="failure-domain label of each machine, in machine order",
    )
    add_flag(
        p, "--domain-size", type=int, help="machines per failure domain (instead of --domains)"
    )
    add_output_flags(p, plot=False)
    p.set_defaults(run=run)


def _domains(args: argparse.Namespace) -> list[str] | None:
    if args.domains and args.domain_size:
        raise ConfigError("give --domains or --domain-size, not both")
    if args.domains:
        return [label.strip() for label in str(args.domains).split(",")]
    if args.domain_size:
        if args.domain_size < 1:
            raise ConfigError(f"--domain-size must be >= 1, got {args.domain_size}")
        return [f"d{i // args.domain_size}" for i in range(args.machines)]
    return None


def _failure_counts(args: argparse.Namespace) -> list[int]:
    if not args.failures:
        return list(range(1, min(args.replicas + 1, args.machines) + 1))
    try:
        return [int(k) for k in str(args.failures).split(",")]
    except ValueError as e:
        raise ConfigError(f"--failures must be integers like 2,3: {e}") from e


def _probabilities(p: Placement, ks: list[int]) -> list[dict[str, Any]]:
    ring = ring_placement(p.machines, p.replicas)
    rows = []
    for k in ks:
        row: dict[str, Any] = {
            "failures": k,
            "recover": float(recovery_probability(p, k)),
            "ring": float(recovery_probability(ring, k)),
        }
        if k == p.replicas:
            row["theorem1_bound"] = float(theorem1_upper_bound(p.machines, p.replicas))
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    """Print the placement and its recovery probabilities."""
    try:
        placement, reason = place(args.machines, args.replicas, args.strategy, _domains(args))
        rows = _probabilities(placement, _failure_counts(args))
    except PlacementError as e:
        raise ConfigError(str(e)) from e
    if args.output == "json":
        doc = {
            "reason": reason,
            "kind": placement.kind,
            "groups": [list(g) for g in placement.groups],
            "holders": [list(h) for h in placement.holders],
            "probabilities": rows,
        }
        print(json.dumps(doc, indent=2))
        return 0
    print(reason)
    print("groups: " + " ".join("{" + ",".join(map(str, g)) + "}" for g in placement.groups))
    holders = [
        [
            m,
            ",".join(map(str, placement.holders_of(m))),
            ",".join(map(str, placement.replicas_of(m))),
        ]
        for m in range(placement.machines)
    ]
    print(render_table(["machine", "held by", "stores"], holders))
    print()
    headers = ["k failures", "P(recover)", "ring", "Theorem 1 bound (k=m)"]
    print(
        render_table(
            headers,
            [[r["failures"], r["recover"], r["ring"], r.get("theorem1_bound", "")] for r in rows],
        )
    )
    return 0
