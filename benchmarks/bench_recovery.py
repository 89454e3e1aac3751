"""Where the seconds of a recovery go, phase by phase, on the one-host test bed.

Runs the demo GPT (small) on N simulated machines x P trainers and injects one fault per run:

* software failure: `kill-worker` SIGKILLs one trainer; its agent lives and so does its memory;
* machine failure: `kill-machine` kills one machine's agent and trainers and unlinks its memory;
  the root declares it lost when its membership lease expires (`--member-ttl`), the test bed's
  operator starts a replacement with empty memory, and ranks without a copy in memory restore from
  the persistent tier (`--persist-every`).

Each run's milestones come from the agents' events (and the operator's replacement record):

    failed      the fault was injected
    detected    the first sign of it: a trainer seen dead (for a lost machine, usually a surviving
                trainer whose collective broke) or the root's verdict, whichever came first
    decided     the root opened the generation that got the restore plan
    replaced    the replacement machine's agent was up and had joined (machine failure only)
    planned     the root published the restore plan
    spawned     every agent had started its new trainers (after filling memory from the
                persistent tier where the plan says so)
    restored    every rank had loaded and verified its state
    first step  every machine had completed the first step after the restore

The phases are the gaps between consecutive milestones; JSON holds every run's milestones, phases,
each rank's restore source and load time, plus min and median per phase.

    python benchmarks/bench_recovery.py --repeats 3 --out docs/results/recovery.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from gemini_ckpt import demo
from gemini_ckpt.observability import events as ev
from gemini_ckpt.observability.events import read_events
from gemini_ckpt.testbed.local import LocalSpec, LocalTestbed

SCRIPT = Path(demo.__file__).parent / "train_gpt.py"
MILESTONES = (
    "failed",
    "detected",
    "decided",
    "replaced",
    "planned",
    "spawned",
    "restored",
    "first_step",
)
"""In the order they happen ("replaced" only for a machine failure)."""
PHASES = {
    "detect": ("failed", "detected"),
    "decide": ("detected", "decided"),
    "replace": ("decided", "replaced"),
    "plan": ("replaced", "planned"),
    "spawn": ("planned", "spawned"),
    "load": ("spawned", "restored"),
    "first_step": ("restored", "first_step"),
}
"""Phase -> (from milestone, to milestone); without a replacement, "plan" starts at "decided"."""
SCENARIOS = {
    "software": "software failure",
    "machine": "machine failure",
    "machine-disk": "machine failure, no peer replicas",
    "standby": "machine failure, warm standby",
}
"""Scenario -> its label in tables. Machine failures restore the lost ranks from a peer's replica,
except machine-disk (--replicas 1), which falls back to the persistent tier."""
KINDS = {s: "software failure" if s == "software" else "machine failure" for s in SCENARIOS}
"""Scenario -> the incident kind the root must record for the run to count."""


def _first(records: list[dict[str, Any]], kind: str, **match: Any) -> dict[str, Any] | None:
    return next(
        (e for e in records if e["event"] == kind and all(e.get(k) == v for k, v in match.items())),
        None,
    )


def milestones(records: list[dict[str, Any]], replacements: list[dict[str, Any]]) -> dict[str, Any]:
    """The milestones of the one recovery in a run's events (wall-clock seconds; pure)."""
    fault = _first(records, ev.FAULT_INJECTED)
    plan = next(
        (e for e in records if e["event"] == ev.PLAN_DECIDED and e.get("generation", 0) > 0), None
    )
    if fault is None or plan is None:
        raise RuntimeError("the run has no injected fault or no recovery plan after it")
    failed, generation = float(fault["t"]), int(plan["generation"])
    incident = _first(records, ev.INCIDENT, generation=generation)
    decided = float(incident["decided_at"]) if incident else float(plan["t"])
    symptoms = [
        float(e["t"])
        for e in records
        if e["event"] in (ev.WORKER_FAILED, ev.HANG, ev.INCIDENT) and float(e["t"]) >= failed
    ]
    out: dict[str, Any] = {
        "generation": generation,
        "kind": incident.get("kind") if incident else None,
        "failed": failed,
        "detected": min([*symptoms, decided]),
        "decided": decided,
        "replaced": None,
        "planned": float(plan["t"]),
    }
    if replacements:
        machine = int(replacements[0]["machine"])
        joined = [
            float(e["t"])
            for e in records
            if e["event"] == ev.AGENT_STARTED and e.get("machine") == machine and e["t"] > failed
        ]
        out["replaced"] = min(joined) if joined else float(replacements[0]["replaced_at"])
        out["operator"] = {k: replacements[0].get(k) for k in ("started_at", "replaced_at")}
    in_gen = [e for e in records if e.get("generation") == generation]
    spawned = [float(e["t"]) for e in in_gen if e["event"] == ev.GENERATION_STARTED]
    restored = [e for e in in_gen if e["event"] == ev.RESTORED]
    out["spawned"] = max(spawned) if spawned else None
    out["restored"] = max(float(e["t"]) for e in restored) if restored else None
    firsts: dict[int, float] = {}
    for e in in_gen:
        if e["event"] == ev.PROGRESS:
            firsts.setdefault(int(e["machine"]), float(e["t"]))
    out["first_step"] = max(firsts.values()) if firsts else None
    out["restored_step"] = plan.get("step")
    out["sources"] = {
        str(e["rank"]): e["source"] for e in sorted(restored, key=lambda e: e["rank"])
    }
    out["load_seconds"] = {str(e["rank"]): float(e["seconds"]) for e in restored}
    committed = [
        int(e["step"]) for e in records if e["event"] == ev.PROGRESS and float(e["t"]) <= failed
    ]
    out["last_step_before_failure"] = max(committed, default=None)
    out["killed_root"] = bool(fault.get("root"))
    return out


def phases(marks: dict[str, Any]) -> dict[str, float]:
    """Seconds per phase, and "total" from the failure to the first step after the restore."""
    out = {}
    for name, (start, end) in PHASES.items():
        begin = "decided" if start == "replaced" and marks["replaced"] is None else start
        if marks.get(begin) is not None and marks.get(end) is not None:
            out[name] = marks[end] - marks[begin]
    if marks.get("first_step") is not None:
        out["total"] = marks["first_step"] - marks["failed"]
    return out


def job_spec(scenario: str, args: argparse.Namespace, run_dir: Path) -> LocalSpec:
    """The test-bed job of one run of `scenario`."""
    world = args.machines * args.nproc_per_machine
    extra: dict[str, Any] = {}
    if scenario == "software":
        fault = f"kill-worker@step={args.fail_at},rank={world - 1}"
    else:
        fault = f"kill-machine@step={args.fail_at},machine={args.machines - 1}"
        extra = {"persist_dir": run_dir / "persist", "persist_every": args.persist_every}
        if scenario == "standby":
            extra["standby"] = 1  # the replacement's agent is already running, imports done
        if scenario == "machine-disk":
            extra["replicas"] = 1
    script_args = ["--steps", str(args.steps), "--d-model", str(args.d_model)]
    script_args += ["--layers", str(args.layers), "--batch", "4", "--seq", "32"]
    return LocalSpec(
        machines=args.machines,
        nproc_per_machine=args.nproc_per_machine,
        script=SCRIPT,
        script_args=tuple(script_args),
        faults=(fault,),
        run_dir=run_dir,
        member_ttl_s=args.member_ttl,
        **extra,
    )


def run_once(scenario: str, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """One job with one fault: its milestones and phases."""
    spec = job_spec(scenario, args, run_dir)
    load = os.getloadavg()[0]  # other work on the host shows in every phase
    with LocalTestbed(spec) as bed:
        code = bed.wait(args.timeout)
        replacements = [dict(r) for r in bed.replacements]  # gone once the bed closes
    if code != 0:
        raise RuntimeError(f"{scenario} run failed (exit code {code}); logs in {run_dir}")
    records = read_events([bed.event_file(m) for m in range(args.machines)])
    marks = milestones(records, replacements)
    if marks["kind"] != KINDS[scenario]:
        raise RuntimeError(f"{scenario} run recovered from a {marks['kind']}; logs in {run_dir}")
    return {
        "fault": spec.faults[0],
        "load_average_before": load,
        "milestones": marks,
        "phases": phases(marks),
    }


def run_scenario(
    scenario: str, args: argparse.Namespace, work: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`--repeats` runs of `scenario`, and the machine failures that hit the root (set apart).

    Which agent wins the root election is a race; a killed root is a different recovery (a new
    root is elected while the lease expires), so such a run is repeated, up to
    `--root-kill-retries` times per scenario, and reported apart.
    """
    runs: list[dict[str, Any]] = []
    root_kills: list[dict[str, Any]] = []
    while len(runs) < args.repeats:
        run = run_once(scenario, args, work / f"{scenario}-{len(runs) + len(root_kills)}")
        hit_root = KINDS[scenario] == "machine failure" and run["milestones"]["killed_root"]
        if hit_root and len(root_kills) < args.root_kill_retries:
            root_kills.append(run)
            print(f"{scenario} run: the killed machine was the root; repeating", flush=True)
            continue
        runs.append(run)
        print(f"{scenario} run {len(runs)}/{args.repeats}: {_brief(run)}", flush=True)
    return runs, root_kills


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Min and median seconds per phase over runs, and every rank's sources."""
    names = [*PHASES, "total"]
    out: dict[str, Any] = {}
    for name in names:
        samples = [r["phases"][name] for r in runs if name in r["phases"]]
        if samples:
            out[name] = {"min": min(samples), "median": statistics.median(samples)}
    loads = [s for r in runs for s in r["milestones"]["load_seconds"].values()]
    if loads:
        out["state_load_per_rank"] = {"min": min(loads), "median": statistics.median(loads)}
    sources: dict[str, set[str]] = {}
    for r in runs:
        for rank, source in r["milestones"]["sources"].items():
            sources.setdefault(rank, set()).add(source)
    out["sources"] = {rank: sorted(s) for rank, s in sorted(sources.items())}
    return out


def import_seconds(processes: int) -> float:
    """Wall time for `processes` fresh interpreters started together to import torch.distributed.

    What every restarted trainer pays before it can rendezvous, on the same cores.
    """
    start = time.perf_counter()
    command = [sys.executable, "-c", "import torch.distributed"]
    children = [subprocess.Popen(command) for _ in range(processes)]
    if any(child.wait() != 0 for child in children):
        raise RuntimeError("python -c 'import torch.distributed' failed")
    return time.perf_counter() - start


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--scenarios", default="software,machine,machine-disk,standby")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--machines", type=int, default=2)
    p.add_argument("--nproc-per-machine", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--fail-at", type=int, default=10, help="step the fault fires after")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--persist-every", type=int, default=4, help="machine failure only")
    p.add_argument("--member-ttl", type=int, default=2, help="lease TTL in seconds")
    p.add_argument(
        "--import-repeats",
        type=int,
        default=3,
        help="times to measure a bare torch import, for reference (0: skip)",
    )
    p.add_argument(
        "--root-kill-retries",
        type=int,
        default=3,
        help="machine failure: repeat a run whose killed machine was the root, up to N times",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="per job, seconds")
    p.add_argument("--work-dir", default="", help="keep run directories here")
    p.add_argument("--out", default="bench-results/recovery.json")
    args = p.parse_args(argv)
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown or args.fail_at >= args.steps:
        p.error(f"unknown scenarios {sorted(unknown)} or --fail-at >= --steps")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write the JSON, print a table; return the results."""
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gemini-bench-recovery-"))
    results: dict[str, Any] = {}
    for scenario in args.scenarios.split(","):
        runs, root_kills = run_scenario(scenario, args, work)
        results[scenario] = {"runs": runs, "summary": summarize(runs), "root_killed": root_kills}
    world = args.machines * args.nproc_per_machine
    reference = {}
    for n in sorted({1, world}) if args.import_repeats else ():
        samples = [import_seconds(n) for _ in range(args.import_repeats)]
        reference[f"import_torch_{n}_processes_s"] = {
            "min": min(samples),
            "median": statistics.median(samples),
        }
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "recovery",
        "machine": {
            "cpus": os.cpu_count(),
            "torch": version("torch"),
            "python": platform.python_version(),
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir")},
        "phases": {name: list(span) for name, span in PHASES.items()},
        "results": results,
        "reference": reference,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for line in table(report):
        print(line)
    return report


def _brief(run: dict[str, Any]) -> str:
    parts = [f"{name} {s:.2f}" for name, s in run["phases"].items()]
    return f"{', '.join(parts)} s; restored step {run['milestones']['restored_step']}"


_TOTALS = {"total": "**failure -> first step**", "state_load_per_rank": "(state load, per rank)"}


def _label(name: str) -> str:
    if name in _TOTALS:
        return _TOTALS[name]
    start, end = PHASES[name]
    start = "replaced or decided" if name == "plan" else start
    return f"{name.replace('_', ' ')}: {start} -> {end.replace('_', ' ')}"


def table(report: dict[str, Any]) -> list[str]:
    """Markdown table: median (min) seconds per phase and scenario, then sources and reference."""
    scenarios = list(report["results"])
    lines = [
        "| phase | " + " | ".join(f"{SCENARIOS[s]}: median (min) s" for s in scenarios) + " |",
        "|---|" + "---|" * len(scenarios),
    ]
    for name in [*PHASES, "total", "state_load_per_rank"]:
        cells = []
        for s in scenarios:
            stats = report["results"][s]["summary"].get(name)
            cells.append(f"{stats['median']:.3f} ({stats['min']:.3f})" if stats else "-")
        lines.append(f"| {_label(name)} | " + " | ".join(cells) + " |")
    lines.append("")
    for s in scenarios:
        sources = report["results"][s]["summary"]["sources"]
        described = ", ".join(f"rank {r}: {'/'.join(v)}" for r, v in sources.items())
        lines.append(f"* {SCENARIOS[s]}: restored from {described}")
        if report["results"][s]["root_killed"]:
            count = len(report["results"][s]["root_killed"])
            lines.append(
                f"* {SCENARIOS[s]}: {count} run(s) killed the root; repeated (in the JSON)"
            )
    for key, stats in report["reference"].items():
        lines.append(
            f"* {key.split('_')[2]} fresh Python process(es) importing torch.distributed at once: "
            f"{stats['median']:.3f} ({stats['min']:.3f}) s"
        )
    return lines


if __name__ == "__main__":
    main()
